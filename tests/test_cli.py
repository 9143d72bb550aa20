"""main.py's contract: user mistakes print one line and exit 2."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('args, message', [
    (['frobnicate', '--config', 'configs/tiny.py'], "unknown command 'frobnicate'"),
    ([], '--config is required'),
    (['--config', 'configs/nope.py'], 'configs/nope.py: no such config file'),
    (['--config', 'configs/tiny.py', '--config.train.stepz=5'],
     'unknown config key --config.train.stepz (Did you mean "steps"'),
    (['--config', 'configs/tiny.py', '--config.train.steps=abc'],
     "--config.train.steps=abc: invalid literal for int()"),
    (['--config', 'configs/tiny.py', '--config.model.dropout=1.5'],
     'config.model.dropout=1.5: must be in [0, 1)'),
    (['--config', 'configs/tiny.py', '--config.model.mlp=relu'],
     "config.model.mlp='relu': must be one of gelu, swiglu, moe"),
    (['prepare', '--config', 'configs/tiny.py', '--config.data.corpus=/no/such/file.jsonl'],
     '/no/such/file.jsonl'),
    (['sample', '--workdir', '/no/such/run'], '--config is required'),
])
def test_user_mistakes_are_one_line_exit_2(args, message):
  out = run(*args)
  assert out.returncode == 2, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith('main.py: error: ') and message in lines[0], lines[0]
  assert 'Traceback' not in out.stdout + out.stderr
