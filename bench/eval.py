"""Evaluation benchmark: one multiple-choice task scored three ways, side by side.

  python bench/eval.py [--workdir RUN] [--items 600] [--num_fewshot 0] [--hf_batch 32]
      [--rounds 1] [--skip_server]

(a) `main.py eval --tasks zh_mc` (in-process lm_eval, our jitted scoring), (b) the lm_eval
command with `--model local-completions` against `main.py serve` at 8 concurrent requests,
(c) the lm_eval command with `--model hf` on the export (transformers on torch). Each is a
fresh process, timed from start to exit (a server's start-up is reported apart); items/s is
items over that time. Each also reports the CPU seconds of its process tree (user + system):
on a shared machine wall seconds move with the neighbours, CPU seconds hardly. (a) and (c)
alternate --rounds times (best of each). The three accuracies must be equal.

The task is zh_mc on items made from the builtin news: a sentence's first half is the
question, its own second half and three other sentences' second halves are the options.
The model (default) is a random-init 'tiny' preset (4 layers, d_model 128, seq_len 256) with
a 4000-token tokenizer trained on the builtin news (bench/serve.py's), or --workdir, a run
of ours; its accuracy is chance, which is what such a model should score.
"""

from __future__ import annotations

import argparse
import csv
import glob
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE, os.path.join(HERE, 'tests'), os.path.join(HERE, 'bench')]

from serve import build_model  # pylint: disable=wrong-import-position
from serving import Served  # pylint: disable=wrong-import-position
import timing  # pylint: disable=wrong-import-position
from zhgpt_jax import builtin_corpus, export  # pylint: disable=wrong-import-position

LM_EVAL = os.path.join(os.path.dirname(sys.executable), 'lm_eval')


def write_items(directory: str, n: int, seed: int = 0) -> None:
  """n four-option items from news sentences into directory/val/news_val.csv (and 5 in dev/)."""
  with open(builtin_corpus.paths()['news'], encoding='utf-8') as f:
    text = ''.join(builtin_corpus.strip_pos_tags(x) for x in itertools.islice(f, 5000))
  sentences = [s + '。' for s in text.split('。') if 16 <= len(s) <= 40]
  rng = random.Random(seed)
  rng.shuffle(sentences)
  halves = [(s[:len(s) // 2], s[len(s) // 2:]) for s in sentences[:n + 5 + 3 * (n + 5)]]
  for split, rows in (('val', range(n)), ('dev', range(n, n + 5))):
    os.makedirs(os.path.join(directory, split), exist_ok=True)
    with open(os.path.join(directory, split, f'news_{split}.csv'), 'w', newline='',
              encoding='utf-8') as f:
      w = csv.writer(f)
      w.writerow(['id', 'question', 'A', 'B', 'C', 'D', 'answer'])
      for i in rows:
        options = [halves[i][1]] + [halves[n + 5 + 3 * i + k][1] for k in range(3)]
        order = list(range(4))
        rng.shuffle(order)
        w.writerow([i, f'“{halves[i][0]}”的下文是？', *(options[k] for k in order),
                    'ABCD'[order.index(0)]])


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
  """(wall seconds, CPU seconds of the process and its children) of one command. CPU seconds
  barely move with the machine's load; wall seconds do."""
  c0 = timing.children_cpu_seconds()
  with timing.Timer() as t:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f'{" ".join(cmd[:4])} ... failed:\n{out.stderr[-3000:]}')
  return t.seconds, timing.children_cpu_seconds() - c0


def accuracy(directory: str) -> float:
  (path,) = glob.glob(os.path.join(directory, '**', 'results_*.json'), recursive=True)
  with open(path, encoding='utf-8') as f:
    return json.load(f)['results']['zh_mc']['acc,none']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', help='a run of ours (default: a random-init tiny model)')
  parser.add_argument('--items', type=int, default=600)
  parser.add_argument('--num_fewshot', type=int, default=0)
  parser.add_argument('--hf_batch', type=int, default=32)
  parser.add_argument('--concurrency', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=1, help='(a) and (c) alternated, best of')
  parser.add_argument('--skip_server', action='store_true', help='(a) and (c) only')
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix='bench_eval_')
  workdir = args.workdir or build_model(root, seq_len=256)
  hf_dir = export.export_workdir(workdir, os.path.join(root, 'export'))
  data = os.path.join(root, 'items')
  write_items(data, args.items)
  env = dict(os.environ, PYTHONPATH=HERE)
  common = ['--tasks', 'zh_mc', '--num_fewshot', str(args.num_fewshot)]
  lm_common = [*common, '--include_path', os.path.join(HERE, 'zhgpt_jax', 'lm_tasks'),
               '--metadata', json.dumps(dict(data_dir=data)), '--log_samples']
  rows = []

  # (a) and (c) alternate --rounds times, so a changing load hits both; the best of each.
  best: dict[str, tuple] = {}
  for r in range(args.rounds):
    out_a = os.path.join(root, f'a{r}')
    t = timed([sys.executable, os.path.join(HERE, 'main.py'), 'eval', '--workdir', workdir,
               *common, '--task_data', data, '--out', out_a], env)
    best['a'] = min(best.get('a', t), t)
    acc_a = accuracy(out_a)
    out_c = os.path.join(root, f'c{r}')
    t = timed([LM_EVAL, '--model', 'hf', '--model_args',
               f'pretrained={hf_dir},dtype=float32', '--device', 'cpu', '--batch_size',
               str(args.hf_batch), *lm_common, '--output_path', out_c], env)
    best['c'] = min(best.get('c', t), t)
    acc_c = accuracy(out_c)
    print(f'round {r}: (a) {best["a"][0]:.1f} s, (c) {best["c"][0]:.1f} s so far; '
          f'load {os.getloadavg()[0]:.1f}', flush=True)
  rows.append(('(a) main.py eval --tasks', *best['a'], acc_a))
  rows.append((f'(c) lm_eval --model hf (batch {args.hf_batch})', *best['c'], acc_c))
  if args.skip_server:
    return _report(args, workdir, rows)

  with timing.Timer() as t:
    server = Served(workdir, timeout=900)
  start = t.seconds
  try:
    out_b = os.path.join(root, 'b')
    t = timed([LM_EVAL, '--model', 'local-completions', '--model_args',
               f'model={os.path.basename(workdir)},base_url={server.url}/v1/completions,'
               f'tokenizer={hf_dir},tokenizer_backend=huggingface,max_length=256,'
               f'num_concurrent={args.concurrency}', *lm_common, '--output_path', out_b], env)
    rows.append((f'(b) lm_eval via main.py serve, {args.concurrency} concurrent '
                 f'(server start {start:.0f} s apart; client CPU only)', *t, accuracy(out_b)))
  finally:
    server.close()
  return _report(args, workdir, rows)


def _report(args, workdir: str, rows: list) -> int:
  base_wall, base_cpu = rows[1][1], rows[1][2]
  print(f'zh_mc, {args.items} items x 4 choices, {args.num_fewshot}-shot; '
        f'model {workdir}; best of {args.rounds} alternating rounds')
  print('| method | wall s | items/s | vs (c) | CPU s | vs (c) by CPU | accuracy |\n'
        '|---|---:|---:|---:|---:|---:|---:|')
  for name, t, cpu, acc in rows:
    print(f'| {name} | {t:.1f} | {args.items / t:.1f} | {base_wall / t:.2f}x | {cpu:.1f} | '
          f'{base_cpu / cpu:.2f}x | {acc:.4f} |')
  accs = {acc for *_, acc in rows}
  print('accuracies equal' if len(accs) == 1 else f'ACCURACIES DIFFER: {sorted(accs)}')
  return 0 if len(accs) == 1 else 1


if __name__ == '__main__':
  sys.exit(main())
