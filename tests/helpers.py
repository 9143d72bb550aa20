"""Plain functions the tests share (pytest puts tests/ on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import os
import socket

from zhgpt_jax import model as M
from zhgpt_jax.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB = 300   # the tokenizer size tiny_cfg assumes; padded to 384 (vocab_multiple=128)


def tiny_cfg(vocab: int = VOCAB, **overrides) -> M.GPTConfig:
  """The GPTConfig of a 2-layer, 4-head, d=64 model with context 64, for `vocab` tokens.

  `overrides` update config.model (e.g. position='rope'); `moe=dict(...)` and `mla=dict(...)`
  update config.model.moe and config.model.mla.
  """
  c = default_config('tiny')
  c.model.update(n_layer=2, n_head=4, d_model=64, seq_len=64)
  moe, mla = overrides.pop('moe', {}), overrides.pop('mla', {})
  c.model.update(overrides)
  c.model.moe.update(moe)
  c.model.mla.update(mla)
  return M.model_config(c.model, vocab)


def free_port() -> int:
  """A TCP port no one listens on now (for a server or a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def devices_env(devices: int, xla_flags: str = '', **extra: str) -> dict:
  """The environment of a subprocess on `devices` simulated CPU devices, with the repository
  and tests/ importable; `extra` adds variables (e.g. JAX_COMPILATION_CACHE_DIR)."""
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {xla_flags}'.strip(),
              PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, 'tests')]), **extra)
