"""Runs `main.py ...` or `lm_eval ...` in this process with lm_eval's model calls timed.

  python bench/eval_probe.py OUT.json main.py eval --tasks ...
  python bench/eval_probe.py OUT.json lm_eval --model hf ...

bench/eval.py's instrument for the model-side rate: `TemplateLM.loglikelihood` (lm_eval's
base of both our in-process model and its HuggingFace model: tokenizes each request's
context and continuation, then scores them) is wrapped by a timer, the same wrapper for both,
and OUT.json gets its wall and CPU seconds summed over the calls. Everything else runs as
the command itself would (its own entry point, arguments and exit status); lm_eval's model
module is imported first, which both commands import anyway.
"""

from __future__ import annotations

import json
import os
import runpy
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, 'bench'))

import timing  # pylint: disable=wrong-import-position
from lm_eval.api import model as lm_model  # pylint: disable=wrong-import-position


def main() -> int:
  out, command, *args = sys.argv[1:]
  spent = dict(seconds=0.0, cpu_seconds=0.0, calls=0, requests=0)
  loglikelihood = lm_model.TemplateLM.loglikelihood

  def timed(self, requests, *a, **kw):
    with timing.Timer() as t:
      result = loglikelihood(self, requests, *a, **kw)
    spent.update(seconds=spent['seconds'] + t.seconds, calls=spent['calls'] + 1,
                 cpu_seconds=spent['cpu_seconds'] + t.cpu_seconds,
                 requests=spent['requests'] + len(requests))
    return result

  lm_model.TemplateLM.loglikelihood = timed
  sys.argv = [command, *args]
  try:
    if command == 'lm_eval':
      from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
      code = cli_evaluate()
    else:
      runpy.run_path(os.path.join(HERE, command), run_name='__main__')
      code = 0
  except SystemExit as e:
    code = e.code
  with open(out, 'w', encoding='utf-8') as f:
    json.dump(spent, f)
  return code or 0


if __name__ == '__main__':
  sys.exit(main())
