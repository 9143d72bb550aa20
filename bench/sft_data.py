"""SFT data at size: first and second start of `main.py` with configs/sft.py, side by side.

  python bench/sft_data.py [--conversations 30000,300000] [--dir /tmp/zhgpt_sft]

Writes messages-format jsonl files of 100 and of each --conversations count (1-4
exchanges, 30% with a system turn, turns of 5-120 characters of People's Daily sentences
and product reviews, so lengths vary from a few tokens to several hundred), and a small
pretrained workdir to start from, as configs/sft.py expects (configs/tiny.py's model with a
--seq_len context, 2 steps on the builtin corpus; its 8,000-token tokenizer).

Then, for each file, each a `main.py train --config configs/sft.py` child (3 steps, at nice
10) whose whole process tree's RSS is polled every 0.1 s, time to step 1 = from the child's
start until its metrics.jsonl holds step 1:
  1. first start: empty data cache and empty compilation cache: reads, tokenizes and packs
     the conversations into the cache, compiles the steps;
  2. second start: a fresh workdir on the same caches: memory-maps the rows, loads the
     compiled steps;
  3. (the largest file) second start with train.compile_cache='' (JAX compiles again).
Each child runs main.py through `--child`, which marks when each start-up stage begins and
ends (the functions are wrapped here; the code is unchanged), so the table also says where
the seconds go: imports, data (the task: the chat cache), state (init_from restored), the
metrics writer, the first train step (tracing + compiling or loading + running it) and the
second (running it: what the first costs beyond compilation).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.abspath(os.path.dirname(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prepare_scale import _pools, _tree_rss  # pylint: disable=wrong-import-position
import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)

STAGES = ('imports', 'data', 'state', 'writer', 'first step', 'second step')


def synthesize(path: str, n: int, seed: int = 0) -> None:
  if os.path.exists(path):
    return
  rng = random.Random(seed)
  news, reviews = _pools()

  def text():
    pool = news if rng.random() < 0.6 else reviews
    out = ''
    target = rng.choice((5, 20, 40, 80, 120))
    while len(out) < target:
      out += rng.choice(pool) + '。'
    return out[:target]

  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    for _ in range(n):
      turns = [{'role': 'system', 'content': '你是一个乐于助人的助手。'}] if rng.random() < 0.3 else []
      for _ in range(rng.randint(1, 4)):
        turns += [{'role': 'user', 'content': text()}, {'role': 'assistant', 'content': text()}]
      f.write(json.dumps({'messages': turns}, ensure_ascii=False) + '\n')
  os.replace(path + '.tmp', path)


def pretrained(directory: str, seq_len: int) -> str:
  """A tiny pretrained workdir (2 steps) with a seq_len-token context, made once."""
  if not os.path.isdir(os.path.join(directory, 'checkpoints')):
    subprocess.run([sys.executable, 'main.py', 'train', '--config', 'configs/tiny.py',
                    '--workdir', directory, f'--config.model.seq_len={seq_len}',
                    '--config.train.steps=2', '--config.optim.warmup_steps=1',
                    '--config.train.eval_every=2', '--config.train.ckpt_every=2',
                    '--config.train.eval_max_batches=1', '--config.train.sample_tokens=0'],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  return directory


# ----------------------------------------------------------------------------- the child

def child(argv: list[str]) -> None:
  """main.py with argv, printing '[stage] <seconds since start> <event>' lines to stderr."""
  clock = timing.Timer().start()

  def mark(event):
    print(f'[stage] {clock.elapsed():.3f} {event}', file=sys.stderr, flush=True)

  import jax  # pylint: disable=import-outside-toplevel
  from zhgpt_jax import metrics, sft, train  # pylint: disable=import-outside-toplevel
  mark('imported')

  def wrap(owner, name, labels):
    fn = getattr(owner, name)
    calls = []

    def wrapped(*args, **kwargs):
      calls.append(1)
      if len(calls) > len(labels):
        return fn(*args, **kwargs)
      label = labels[len(calls) - 1]
      mark(f'> {label}')
      out = jax.block_until_ready(fn(*args, **kwargs))
      mark(f'< {label}')
      return out
    setattr(owner, name, wrapped)

  wrap(sft, 'make_task', ['data'])
  wrap(train, '_start_state', ['state'])
  wrap(metrics.MetricsWriter, '__init__', ['writer'])
  make_train_step = train.make_train_step

  def make_and_mark(*args, **kwargs):
    optimizer, step = make_train_step(*args, **kwargs)
    holder = types.SimpleNamespace(step=step)
    wrap(holder, 'step', ['first step', 'second step'])
    return optimizer, holder.step
  train.make_train_step = make_and_mark
  sys.argv = ['main.py', *argv]
  import runpy  # pylint: disable=import-outside-toplevel
  runpy.run_path(os.path.join(ROOT, 'main.py'), run_name='__main__')


def stage_seconds(stderr: str) -> dict:
  """{stage: seconds} from the child's [stage] lines ('imports' = until 'imported')."""
  marks = [(float(t), e) for t, e in re.findall(r'\[stage\] (\S+) (.+)$', stderr, re.M)]
  out, opened = {}, {}
  for t, event in marks:
    if event == 'imported':
      out['imports'] = t
    elif event.startswith('> '):
      opened[event[2:]] = t
    elif event.startswith('< ') and event[2:] in opened:
      out[event[2:]] = t - opened.pop(event[2:])
  return out


# ----------------------------------------------------------------------------- the parent

def run(data: str, workdir: str, cache: str, init_from: str, seq_len: int,
        compile_cache: str = 'auto') -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), '--child', 'train',
         '--config', 'configs/sft.py', '--workdir', workdir, f'--config.init_from={init_from}',
         f'--config.sft.data={data}', f'--config.data.cache_dir={cache}',
         f'--config.model.seq_len={seq_len}',
         *([] if compile_cache == 'auto' else [f'--config.train.compile_cache={compile_cache}']),
         '--config.train.steps=3', '--config.train.log_every=1', '--config.optim.warmup_steps=1',
         '--config.train.eval_every=1000', '--config.train.eval_max_batches=1',
         '--config.train.ckpt_every=1000', '--config.train.sample_tokens=0']
  shutil.rmtree(workdir, ignore_errors=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  clock = timing.Timer().start()
  proc = subprocess.Popen(['nice', '-n', '10', *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  peak, step1 = 0, None
  while proc.poll() is None:
    peak = max(peak, _tree_rss(proc.pid))
    if step1 is None and os.path.exists(metrics):
      with open(metrics, encoding='utf-8') as f:
        if any(json.loads(l).get('step') == 1 for l in f if l.strip()):
          step1 = clock.elapsed()
    time.sleep(0.1)
  out, err = proc.communicate()
  if proc.returncode:
    raise RuntimeError(err[-3000:])
  line = next((l for l in out.splitlines() if l.startswith('sft data:')), '')
  return dict(seconds_to_step1=step1, wall=clock.elapsed(), peak_rss_mb=peak / 2**20,
              stages=stage_seconds(err), sft_line=line[:300])


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == '--child':
    child(sys.argv[2:])
    return
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--conversations', default='30000,300000')
  parser.add_argument('--dir', default='/tmp/zhgpt_sft')
  parser.add_argument('--seq_len', type=int, default=512,
                      help="the context (configs/sft.py's own is 128)")
  args = parser.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  init_from = pretrained(os.path.join(args.dir, f'pretrained-{args.seq_len}'), args.seq_len)
  sizes = [100] + [int(n) for n in args.conversations.split(',')]
  results = {}
  for n in sizes:
    path = os.path.join(args.dir, f'chat-{n}.jsonl')
    with timing.Timer() as t:
      synthesize(path, n, seed=n)
    print(f'data: {path} ({os.path.getsize(path) / 1e6:.1f} MB), ready in '
          f'{t.seconds:.0f} s', flush=True)
    cache = os.path.join(args.dir, f'cache-{n}-{args.seq_len}')
    shutil.rmtree(cache, ignore_errors=True)
    runs = [('first start', 'auto'), ('second start', 'auto')]
    if n == sizes[-1]:
      runs.append(('second start, compile_cache off', ''))
    for name, compile_cache in runs:
      r = run(path, os.path.join(args.dir, 'w'), cache, init_from, args.seq_len, compile_cache)
      results[f'{n} {name}'] = r
      shown = ', '.join(f'{k} {r["stages"].get(k, 0):.1f}' for k in STAGES)
      print(f'{n:>7} conversations, {name:32} step 1 after {r["seconds_to_step1"]:5.1f} s '
            f'({shown}), peak RSS {r["peak_rss_mb"]:,.0f} MB | {r["sft_line"]}', flush=True)
      with open(os.path.join(args.dir, 'results.json'), 'w', encoding='utf-8') as f:
        json.dump(results, f, indent=1, ensure_ascii=False)


if __name__ == '__main__':
  main()
