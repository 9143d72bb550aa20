"""The `!function` hooks of the lm_eval tasks beside this file; the work is in
zhgpt_jax/eval_tasks.py.

lm_eval loads this file by its path (`--include_path zhgpt_jax/lm_tasks`, or `main.py eval
--tasks`), not as part of the package, so the repository root is put on sys.path when
zhgpt_jax is not importable already (the lm_eval command run from anywhere).
"""

import os
import sys

try:
  from zhgpt_jax import eval_tasks
except ImportError:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  from zhgpt_jax import eval_tasks

load_mc = eval_tasks.load_mc
mc_text = eval_tasks.mc_text
mc_target = eval_tasks.mc_target
load_sentiment = eval_tasks.load_sentiment
