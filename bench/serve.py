"""Serving benchmark: the same 64 requests sent by 1, 4 and 16 concurrent clients.

  python bench/serve.py [--workdir RUN] [--requests 64] [--clients 1,4,16] [--max_tokens 64]
  python bench/serve.py --slots 1,16 [--requests 24 --max_tokens 48 --rounds 3]

Starts `main.py serve` on a free localhost port (default model: a random-init 'tiny' preset,
4 layers, d_model 128, seq_len 256, with a 4000-token tokenizer trained on the builtin news;
or --workdir, a run of ours) and sends `--requests` different greedy streaming completions
with the official openai client, from N client threads at a time. Per level: wall time,
completion tokens/s, wall time relative to 1 client, and time to first token (p50, p95).
Every reply must equal the 1-client reply to the same prompt (the last column).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE, os.path.join(HERE, 'tests')]

import numpy as np  # pylint: disable=wrong-import-position
import openai  # pylint: disable=wrong-import-position

from serving import Served, random_workdir  # pylint: disable=wrong-import-position
from zhgpt_jax import builtin_corpus  # pylint: disable=wrong-import-position
from zhgpt_jax import tokenizer as tok_lib  # pylint: disable=wrong-import-position
from zhgpt_jax.config import default_config  # pylint: disable=wrong-import-position
import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)


def build_model(root: str, seq_len: int) -> str:
  """A workdir with a tokenizer trained on 20k news lines and random 'tiny' weights."""
  with open(builtin_corpus.paths()['news'], encoding='utf-8') as f:
    lines = [builtin_corpus.strip_pos_tags(x) for x in itertools.islice(f, 20_000)]
  tok_dir = os.path.join(root, 'tokenizer')
  tok_lib.save_tokenizer(tok_lib.train_tokenizer(lines, vocab_size=4000), tok_dir)
  config = default_config('tiny')
  config.tokenizer.vocab_size = 4000
  return random_workdir(config, tok_dir, os.path.join(root, 'model'), seq_len=seq_len,
                        scale=0.02)


def one(client, prompt: str, max_tokens: int,
        model: str = 'model') -> tuple[str, float, int, float]:
  """A streamed greedy completion: (text, time to first token, tokens, total seconds)."""
  first, pieces, tokens = None, [], 0
  with timing.Timer() as t:
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                           temperature=0, stream=True,
                                           stream_options=dict(include_usage=True)):
      if chunk.choices and chunk.choices[0].text:
        first = first or t.elapsed()
        pieces.append(chunk.choices[0].text)
      if chunk.usage:
        tokens = chunk.usage.completion_tokens
  return ''.join(pieces), first or float('nan'), tokens, t.seconds


def one_client(args) -> None:
  """One client's tokens/s from servers that differ only in serve.slots: the best of
  `--rounds` rounds, the servers taking turns within a round."""
  slots = [int(x) for x in args.slots.split(',')]
  prompts = [f'第{i}条新闻：人民群众生活' for i in range(args.requests)]
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or build_model(tmp, args.seq_len)
    servers = []
    try:
      for n in slots:
        servers.append(Served(workdir, f'--config.serve.slots={n}', env={'ZHGPT_API_KEY': ''},
                              timeout=900))
      clients = [openai.OpenAI(base_url=f'{s.url}/v1', api_key='none', max_retries=0,
                               timeout=600) for s in servers]
      name = os.path.basename(os.path.normpath(workdir))   # the served model's id
      best, replies = [0.0] * len(slots), [None] * len(slots)
      for c in clients:
        one(c, prompts[0], 4, model=name)   # warm-up: connection, first dispatch
      for _ in range(args.rounds):
        for i, c in enumerate(clients):
          with timing.Timer() as t:
            out = [one(c, p, args.max_tokens, model=name) for p in prompts]
          best[i] = max(best[i], sum(o[2] for o in out) / t.seconds)
          replies[i] = [o[0] for o in out]
    finally:
      for s in servers:
        s.close()
  print(f'one client, {args.requests} streamed greedy requests of {args.max_tokens} tokens, '
        f'best of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} on '
        f'{os.cpu_count()} cores')
  print('\n| serve.slots | tokens/s | / first | replies = first server\'s |')
  print('|---:|---:|---:|---:|')
  for n, tps, r in zip(slots, best, replies):
    print(f'| {n} | {tps:,.0f} | {tps / best[0]:.2f}x | {r == replies[0]} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='')
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--requests', type=int, default=64)
  parser.add_argument('--clients', default='1,4,16')
  parser.add_argument('--max_tokens', type=int, default=64)
  parser.add_argument('--slots', default='', help='e.g. 1,16: one client against servers of '
                      'these slot counts instead (all up at once, rounds interleaved)')
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  if args.slots:
    one_client(args)
    return

  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or build_model(tmp, args.seq_len)
    with timing.Timer() as t:
      server = Served(workdir, env={'ZHGPT_API_KEY': ''}, timeout=600)
    print(f'server up in {t.seconds:.0f}s (load, compile); '
          f'{server.output().strip().splitlines()[0]}')
    try:
      client = openai.OpenAI(base_url=f'{server.url}/v1', api_key='none', max_retries=0,
                             timeout=600)
      prompts = [f'第{i}条新闻：人民群众生活' for i in range(args.requests)]
      name = os.path.basename(os.path.normpath(workdir))   # the served model's id
      one(client, prompts[0], 4, model=name)   # warm-up: connection, first dispatch
      rows, first_replies = [], None
      for n in [int(x) for x in args.clients.split(',')]:
        with timing.Timer() as t, concurrent.futures.ThreadPoolExecutor(n) as pool:
          out = list(pool.map(lambda p: one(client, p, args.max_tokens, model=name), prompts))
        wall = t.seconds
        replies = [o[0] for o in out]
        first_replies = first_replies or replies
        ttft = np.array([o[1] for o in out])
        tokens = sum(o[2] for o in out)
        same = np.mean([a == b for a, b in zip(replies, first_replies)])
        rows.append((n, wall, tokens / wall, np.percentile(ttft, 50), np.percentile(ttft, 95),
                     same, tokens))
    finally:
      server.close()
  base = rows[0][1]
  print(f'{args.requests} requests, {args.max_tokens} max tokens each, greedy, streamed; '
        f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  print('\n| clients | wall s | tokens | tokens/s | wall / 1 client | TTFT p50 ms | TTFT p95 ms '
        '| replies = 1-client replies |')
  print('|---:|---:|---:|---:|---:|---:|---:|---:|')
  for n, wall, tps, p50, p95, same, tokens in rows:
    print(f'| {n} | {wall:.1f} | {tokens} | {tps:,.0f} | {wall / base:.2f}x | {p50 * 1e3:,.0f} '
          f'| {p95 * 1e3:,.0f} | {same:.0%} |')


if __name__ == '__main__':
  main()
