"""SFT data at size: a synthetic chat set packed once into cached shards, then memory-mapped.

  python bench/sft_data.py [--conversations 300000] [--dir /tmp/zhgpt_sft]

Writes a messages-format jsonl of --conversations conversations (1-4 exchanges, an optional
system turn, turns of 5-120 characters of People's Daily sentences and product reviews, so
lengths vary from a few tokens to several hundred), and a 100-conversation file of the same
kind. Then, each a `main.py train` child (tiny model, task=sft, 3 steps, at nice 10) whose
whole process tree's RSS is polled every 0.1 s, with time to step 1 = until metrics.jsonl
holds step 1:
  1. the small file: the model's own time and peak RSS (the baseline);
  2. the big file, first start: reads, tokenizes, packs and caches;
  3. the big file again, in a fresh workdir but the same cache: memory-maps the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prepare_scale import _pools, _tree_rss  # pylint: disable=wrong-import-position


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


def run(data: str, workdir: str, cache: str, tokenizer: str) -> dict:
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), 'train', '--config', 'configs/tiny.py',
         '--workdir', workdir, '--config.task=sft', f'--config.sft.data={data}',
         f'--config.tokenizer.path={tokenizer}', f'--config.data.cache_dir={cache}',
         '--config.train.steps=3', '--config.train.log_every=1', '--config.optim.warmup_steps=1',
         '--config.train.short_seq_steps=0', '--config.train.eval_every=1000',
         '--config.train.eval_max_batches=1', '--config.train.ckpt_every=1000',
         '--config.train.sample_tokens=0', '--config.model.seq_len=512']
  shutil.rmtree(workdir, ignore_errors=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  t0 = time.perf_counter()
  proc = subprocess.Popen(['nice', '-n', '10', *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  peak, step1 = 0, None
  while proc.poll() is None:
    peak = max(peak, _tree_rss(proc.pid))
    if step1 is None and os.path.exists(metrics):
      with open(metrics, encoding='utf-8') as f:
        if any(json.loads(l).get('step') == 1 for l in f if l.strip()):
          step1 = time.perf_counter() - t0
    time.sleep(0.1)
  out = proc.stdout.read()
  if proc.returncode:
    raise RuntimeError(out[-3000:])
  line = next((l for l in out.splitlines() if l.startswith('sft data:')), '')
  return dict(seconds_to_step1=step1, wall=time.perf_counter() - t0, peak_rss_mb=peak / 2**20,
              sft_line=line[:300])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--conversations', type=int, default=300_000)
  parser.add_argument('--dir', default='/tmp/zhgpt_sft')
  parser.add_argument('--tokenizer', default='/tmp/zhgpt_scale/tokenizer-8000')
  args = parser.parse_args()
  os.makedirs(args.dir, exist_ok=True)
  big = os.path.join(args.dir, f'chat-{args.conversations}.jsonl')
  small = os.path.join(args.dir, 'chat-100.jsonl')
  t0 = time.time()
  synthesize(big, args.conversations)
  synthesize(small, 100, seed=1)
  print(f'data: {big} ({os.path.getsize(big) / 1e6:.0f} MB), made in {time.time() - t0:.0f} s',
        flush=True)
  cache = os.path.join(args.dir, 'cache')
  shutil.rmtree(cache, ignore_errors=True)
  results = {}
  results['model_only (100 conversations)'] = run(small, os.path.join(args.dir, 'w0'), cache,
                                                  args.tokenizer)
  results['first start'] = run(big, os.path.join(args.dir, 'w1'), cache, args.tokenizer)
  results['second start'] = run(big, os.path.join(args.dir, 'w2'), cache, args.tokenizer)
  for k, v in results.items():
    print(f'{k:32} step 1 after {v["seconds_to_step1"]:.1f} s, peak RSS {v["peak_rss_mb"]:.0f} MB'
          f' | {v["sft_line"]}', flush=True)
  with open(os.path.join(args.dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1, ensure_ascii=False)


if __name__ == '__main__':
  main()
