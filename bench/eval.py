"""Evaluation benchmark: one multiple-choice task scored three ways, side by side.

  python bench/eval.py [--workdir RUN] [--items 600 [2000 ...]] [--num_fewshot 0]
      [--hf_batch 32] [--rounds 1] [--skip_server]

(a) `main.py eval --tasks zh_mc` (in-process lm_eval, our jitted scoring), (b) the lm_eval
command with `--model local-completions` against `main.py serve` at 8 concurrent requests,
(c) the lm_eval command with `--model hf` on the export (transformers on torch). Each is a
fresh process, timed from start to exit (a server's start-up is reported apart); items/s is
items over that time. Each also reports the CPU seconds of its process tree (user + system):
on a shared machine wall seconds move with the neighbours, CPU seconds less, though torch's
(c) grow with the load too (its threads spin while they wait for a core). (a) and (c)
alternate --rounds times (best of each). The three accuracies must be equal.

Both (a) and (c) pay lm_eval's own fixed costs (imports, task building, metrics); the model
side is reported apart: the seconds spent inside lm_eval's loglikelihood calls (tokenizing
and scoring the requests), timed by the same wrapper in both processes (bench/eval_probe.py,
which runs each command's own entry point). One table per --items count shows how the
ratio moves with size.

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
PROBE = os.path.join(HERE, 'bench', 'eval_probe.py')


def write_items(directory: str, n: int, seed: int = 0) -> None:
  """n four-option items from news sentences into directory/val/news_val.csv (and 5 in dev/)."""
  need = 4 * (n + 5)   # each item's question half, its own half and three others' halves
  with open(builtin_corpus.paths()['news'], encoding='utf-8') as f:
    # 5,000 lines hold ~4,100 such sentences: 5,000 lines for every 4,000 needed.
    lines = 5000 * -(-need // 4000)
    text = ''.join(builtin_corpus.strip_pos_tags(x) for x in itertools.islice(f, lines))
  sentences = [s + '。' for s in text.split('。') if 16 <= len(s) <= 40]
  if len(sentences) < need:
    raise SystemExit(f'--items {n}: the builtin news has too few sentences of 16-40 characters')
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


def timed(cmd: list[str], env: dict, probe: str | None = None) -> dict:
  """Wall and CPU seconds (of the process and its children) of one command, and with `probe`
  (the JSON bench/eval_probe.py writes) those spent inside lm_eval's loglikelihood calls.
  CPU seconds barely move with the machine's load; wall seconds do."""
  c0 = timing.children_cpu_seconds()
  with timing.Timer() as t:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f'{" ".join(cmd[:4])} ... failed:\n{out.stderr[-3000:]}')
  times = dict(wall=t.seconds, cpu=timing.children_cpu_seconds() - c0)
  if probe:
    with open(probe, encoding='utf-8') as f:
      spent = json.load(f)
    times.update(model_wall=spent['seconds'], model_cpu=spent['cpu_seconds'])
  return times


def accuracy(directory: str) -> float:
  (path,) = glob.glob(os.path.join(directory, '**', 'results_*.json'), recursive=True)
  with open(path, encoding='utf-8') as f:
    return json.load(f)['results']['zh_mc']['acc,none']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', help='a run of ours (default: a random-init tiny model)')
  parser.add_argument('--items', type=int, nargs='+', default=[600],
                      help='item counts, each its own table')
  parser.add_argument('--num_fewshot', type=int, default=0)
  parser.add_argument('--hf_batch', type=int, default=32)
  parser.add_argument('--concurrency', type=int, default=8)
  parser.add_argument('--rounds', type=int, default=1, help='(a) and (c) alternated, best of')
  parser.add_argument('--skip_server', action='store_true', help='(a) and (c) only')
  args = parser.parse_args()
  root = tempfile.mkdtemp(prefix='bench_eval_')
  workdir = args.workdir or build_model(root, seq_len=256)
  hf_dir = export.export_workdir(workdir, os.path.join(root, 'export'))
  env = dict(os.environ, PYTHONPATH=HERE)
  print(f'zh_mc, four-option items, {args.num_fewshot}-shot; model {workdir}; best of '
        f'{args.rounds} alternating rounds (each column its own best)', flush=True)
  failed = 0
  for items in args.items:
    data = os.path.join(root, f'items{items}')
    write_items(data, items)
    failed += _one_size(args, items, data, workdir, hf_dir, env, os.path.join(root, str(items)))
  return min(failed, 1)


def _one_size(args, items: int, data: str, workdir: str, hf_dir: str, env: dict,
              root: str) -> int:
  """One table: (a) and (c) alternated --rounds times, then (b); 1 if the accuracies differ."""
  common = ['--tasks', 'zh_mc', '--num_fewshot', str(args.num_fewshot)]
  lm_common = [*common, '--include_path', os.path.join(HERE, 'zhgpt_jax', 'lm_tasks'),
               '--metadata', json.dumps(dict(data_dir=data)), '--log_samples']
  commands = {
      'a': lambda out: ['main.py', 'eval', '--workdir', workdir, *common, '--task_data', data,
                        '--out', out],
      'c': lambda out: ['lm_eval', '--model', 'hf', '--model_args',
                        f'pretrained={hf_dir},dtype=float32', '--device', 'cpu',
                        '--batch_size', str(args.hf_batch), *lm_common, '--output_path', out]}
  # (a) and (c) alternate, so a changing load hits both; each number the best of its rounds.
  best: dict[str, dict] = {}
  accs: dict[str, float] = {}
  for r in range(args.rounds):
    for key, command in commands.items():
      out, probe = os.path.join(root, f'{key}{r}'), os.path.join(root, f'{key}{r}.json')
      t = timed([sys.executable, PROBE, probe, *command(out)], env, probe)
      best[key] = {k: min(v, best.get(key, t)[k]) for k, v in t.items()}
      accs[key] = accuracy(out)
    print(f'{items} items, round {r}: (a) {best["a"]["wall"]:.1f} s, (c) '
          f'{best["c"]["wall"]:.1f} s so far; load {os.getloadavg()[0]:.1f}', flush=True)
  rows = [('(a) main.py eval --tasks', best['a'], accs['a']),
          (f'(c) lm_eval --model hf (batch {args.hf_batch})', best['c'], accs['c'])]
  if not args.skip_server:
    rows.append(_server_row(args, workdir, hf_dir, lm_common, env, os.path.join(root, 'b')))
  return _report(items, rows)


def _server_row(args, workdir: str, hf_dir: str, lm_common: list[str], env: dict, out: str):
  """(b): the lm_eval command against `main.py serve` (the client's process tree timed)."""
  with timing.Timer() as t:
    server = Served(workdir, timeout=900)
  start = t.seconds
  try:
    t = timed([LM_EVAL, '--model', 'local-completions', '--model_args',
               f'model={os.path.basename(workdir)},base_url={server.url}/v1/completions,'
               f'tokenizer={hf_dir},tokenizer_backend=huggingface,max_length=256,'
               f'num_concurrent={args.concurrency}', *lm_common, '--output_path', out], env)
  finally:
    server.close()
  return (f'(b) lm_eval via main.py serve, {args.concurrency} concurrent '
          f'(server start {start:.0f} s apart; client CPU only)', t, accuracy(out))


def _report(items: int, rows: list) -> int:
  """Prints one size's table; 1 if the accuracies differ."""
  base = rows[1][1]
  print(f'\n{items} items ({4 * items} choice scorings); model = inside lm_eval\'s '
        'loglikelihood calls (bench/eval_probe.py)')
  print('| method | wall s | items/s | vs (c) | CPU s | vs (c) by CPU | model wall s | '
        'model items/s | vs (c) | model CPU s | vs (c) by CPU | accuracy |\n'
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  for name, t, acc in rows:
    model = ('| - | - | - | - | - ' if 'model_wall' not in t else
             f'| {t["model_wall"]:.1f} | {items / t["model_wall"]:.1f} | '
             f'{base["model_wall"] / t["model_wall"]:.2f}x | {t["model_cpu"]:.1f} | '
             f'{base["model_cpu"] / t["model_cpu"]:.2f}x ')
    print(f'| {name} | {t["wall"]:.1f} | {items / t["wall"]:.1f} | '
          f'{base["wall"] / t["wall"]:.2f}x | {t["cpu"]:.1f} | {base["cpu"] / t["cpu"]:.2f}x '
          f'{model}| {acc:.4f} |')
  accs = {acc for *_, acc in rows}
  print('accuracies equal' if len(accs) == 1 else f'ACCURACIES DIFFER: {sorted(accs)}',
        flush=True)
  return 0 if len(accs) == 1 else 1


if __name__ == '__main__':
  sys.exit(main())
