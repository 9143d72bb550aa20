"""A Llama-style GPT: RoPE, SwiGLU, RMSNorm, no biases, untied embeddings.

The same model code as GPT-2 with its switches flipped; exports as LlamaForCausalLM.
`--config configs/modern.py:tiny` gives the CPU-sized version of the tiny recipe. On a GPU
(the other sizes) it trains as configs/base.py does: Muon on the blocks' matrices + Adam on the
rest (BENCHMARKS.md "Recipes"), bfloat16, cuDNN attention.
"""

from zhgpt_jax.config import load_preset


def get_config(size='small'):
  c = load_preset('tiny') if size == 'tiny' else load_preset('base', size)
  c.model.update(position='rope', rope_theta=10000.0, mlp='swiglu', norm='rmsnorm',
                 norm_eps=1e-6, bias=False, tie_embeddings=False)
  return c
