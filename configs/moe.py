"""A DeepSeekMoE-style GPT on the builtin corpus, sized for a CPU.

Fine-grained routed experts (8, top-2) plus one always-on shared expert in every layer,
on the Llama-style backbone; exports as Qwen2MoeForCausalLM.
"""

from configs import modern


def get_config():
  c = modern.get_config('tiny')
  c.model.mlp = 'moe'
  c.model.moe.update(n_routed=8, n_shared=1, top_k=2, gate='softmax', every=1,
                     aux_weight=0.01, z_weight=0.001)
  return c
