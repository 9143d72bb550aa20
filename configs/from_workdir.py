"""The config a run saved in its workdir: `--config configs/from_workdir.py:DIR`.

main.py uses it when eval/sample/chat/export/serve get --workdir and no --config, so overrides
such as --config.sample.temperature=0.5 still apply. A key or section the saved config lacks
(a run saved before it existed, e.g. `serve`) takes its default; `hf:DIR` (a HuggingFace
directory, for serve) has no saved config and takes the defaults.
"""

import json
import os

import ml_collections

from zhgpt_jax.config import default_config


def get_config(workdir):
  config = default_config()
  if workdir.startswith('hf:'):
    return config
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    saved = ml_collections.ConfigDict(json.load(f))
  _fill(saved, config)
  return saved


def _fill(saved, defaults):
  for key, value in defaults.items():
    if key not in saved:
      saved[key] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        saved[key], ml_collections.ConfigDict):
      _fill(saved[key], value)
