"""GPT-2 small (124M) pretraining on a GPU: the default config in bfloat16 with cuDNN attention.

The optimiser is Muon on the blocks' matrices (muon_lr 0.02, Nesterov momentum 0.95) and Adam
on embeddings, head, norms and biases at GPT-2's AdamW rate (6e-4), weight decay 0.1, beta2
0.95, clipping; warmup then cosine decay to 10%, and a short context (256) for the first 2000
steps before the full 1024. Why Muon + Adam rather than GPT-2's AdamW (still one flag away:
`--config.optim.name=adamw`): BENCHMARKS.md "Recipes". Pick another GPT-2 size with
`--config configs/base.py:medium` (tiny, small, medium, large, xl).
"""

from zhgpt_jax.config import default_config


def get_config(preset='small'):
  c = default_config(preset)
  c.model.dtype = 'bfloat16'
  c.model.attention = 'cudnn'
  # Muon on the hidden matrices: faster per token than AdamW on our CPU runs (BENCHMARKS.md
  # "Recipes") and at 124M in public runs (modded-nanogpt; Jordan et al. 2024; Liu et al. 2025).
  # Its rate is per-matrix normalised, so Muon's usual 0.02 carries across widths; the Adam
  # part keeps the AdamW recipe's 6e-4 (tiny.py's 3e-2 suits d=128 and 2k-token batches only).
  c.optim.update(name='muon', muon_lr=0.02, muon_beta=0.95, lr=6e-4)
  return c
