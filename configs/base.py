"""GPT-2 small (124M) pretraining on a GPU: the default config in bfloat16 with cuDNN attention.

Warmup then cosine decay to 10% of a pretraining-sized peak (6e-4), AdamW with weight decay
0.1 and beta2 0.95, gradient clipping, and a short context (256) for the first 2000 steps
before the full 1024. Pick another GPT-2 size with `--config configs/base.py:medium`
(tiny, small, medium, large, xl).
"""

from zhgpt_jax.config import default_config


def get_config(preset='small'):
  c = default_config(preset)
  c.model.dtype = 'bfloat16'
  c.model.attention = 'cudnn'
  return c
