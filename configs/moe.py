"""DeepSeekMoE-style GPTs on the builtin corpus, sized for a CPU, on the Llama-style backbone.

`--config configs/moe.py` (default): 8 routed experts (top-2) plus one always-on shared
expert in every layer, softmax gate and the balance loss; exports as Qwen2MoeForCausalLM.

`--config configs/moe.py:deepseek`: DeepSeekMoE's fine-grained shape -- 64 routed experts of
width 64 (half of d_model), 6 active, 2 shared, the first layer a dense MLP -- with
DeepSeek-V3's sigmoid gate and auxiliary-loss-free balancing (a per-expert routing bias
moved by ±bias_rate after every step: 0.01 here; DeepSeek-V3's 0.001 suits runs of many
thousands of steps and needed ~200 of this preset's 300 to catch up with the router, see
BENCHMARKS.md). Per MoE layer a token uses 8 of 66 experts: 1.6M routed parameters, 0.2M
active. Sparse dispatch runs only the chosen experts, so a step costs
about what tiny's dense step does (bench/moe.py). The bias has no Qwen2-MoE counterpart, so
this model does not export; `--config.model.moe.balance=aux` trains with the balance loss.
"""

from zhgpt_jax.config import load_preset


def get_config(variant='small'):
  c = load_preset('modern', 'tiny')
  c.model.mlp = 'moe'
  if variant == 'deepseek':
    c.model.moe.update(n_routed=64, n_shared=2, top_k=6, expert_hidden=64, first_dense=1,
                       gate='sigmoid', balance='bias', bias_rate=0.01, aux_weight=0.01,
                       z_weight=0.001, capacity_factor=2.0)
  else:
    c.model.moe.update(n_routed=8, n_shared=1, top_k=2, gate='softmax', every=1,
                       aux_weight=0.01, z_weight=0.001)
  return c
