"""The config a run saved in its workdir: `--config configs/from_workdir.py:DIR`.

main.py uses it when eval/sample/chat/export get --workdir and no --config, so overrides
such as --config.sample.temperature=0.5 still apply.
"""

import json
import os

import ml_collections


def get_config(workdir):
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))
