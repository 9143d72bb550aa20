"""The config a run saved in its workdir: `--config configs/from_workdir.py:DIR`.

main.py uses it when eval/sample/chat/export/serve get --workdir and no --config, so overrides
such as --config.sample.temperature=0.5 still apply. A key or section the saved config lacks
(a run saved before it existed, e.g. `serve`) takes its default; `hf:DIR` (a HuggingFace
directory, for serve) has no saved config and takes the defaults. An unreadable config.json
is one UserError line.
"""

import os

from zhgpt_jax.config import default_config, load_config_json


def get_config(workdir):
  if workdir.startswith('hf:'):
    return default_config()
  return load_config_json(os.path.join(workdir, 'config.json'))
