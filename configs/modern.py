"""A Llama-style GPT: RoPE, SwiGLU, RMSNorm, no biases, untied embeddings.

The same model code as GPT-2 with its switches flipped; exports as LlamaForCausalLM.
`--config configs/modern.py:tiny` gives the CPU-sized version of the tiny recipe.
"""

from configs import tiny
from zhgpt_jax.config import default_config


def get_config(size='small'):
  c = tiny.get_config() if size == 'tiny' else default_config(size)
  if size != 'tiny':
    c.model.dtype = 'bfloat16'
    c.model.attention = 'cudnn'
  c.model.update(position='rope', rope_theta=10000.0, mlp='swiglu', norm='rmsnorm',
                 norm_eps=1e-6, bias=False, tie_embeddings=False)
  return c
