"""Plain functions the tests share (pytest puts tests/ on sys.path: `from helpers import ...`)."""

from __future__ import annotations

from zhgpt_jax import model as M
from zhgpt_jax.config import default_config

VOCAB = 300   # the tokenizer size tiny_cfg assumes; padded to 384 (vocab_multiple=128)


def tiny_cfg(vocab: int = VOCAB, **overrides) -> M.GPTConfig:
  """The GPTConfig of a 2-layer, 4-head, d=64 model with context 64, for `vocab` tokens.

  `overrides` update config.model (e.g. position='rope'); `moe=dict(...)` updates
  config.model.moe.
  """
  c = default_config('tiny')
  c.model.update(n_layer=2, n_head=4, d_model=64, seq_len=64)
  moe = overrides.pop('moe', {})
  c.model.update(overrides)
  c.model.moe.update(moe)
  return M.model_config(c.model, vocab)
