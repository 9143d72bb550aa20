"""Recipes by evidence: train a list of configs on the builtin corpus at one budget, ≥ 3 seeds
each, and write one table (val bits/char, tokens, FLOPs, wall time, greedy longest run).

  PYTHONPATH=. python bench/recipes.py [--rows gpt2-muon,llama-muon] [--seeds 3]
      [--first_seed 0] [--budget 300] [--jobs 2] [--threads 1]
      [--workdir runs/recipes] [--data_root runs/recipes/data]

A row is one line of ROWS: a name, a config (`configs/X.py[:arg]`) and its overrides (the
`--config.a.b=v` flags of main.py, as a dict). Add one and rerun: finished (row, seed) runs
are kept in <workdir>/results.jsonl, keyed by everything that decides them, and skipped.

The budget is equal training FLOPs per row: `--budget N` is the FLOPs of N steps of
configs/tiny.py:gpt2, the tiny recipe on GPT-2's blocks (its model.flops_per_token × its tokens
per step, counted from the model: 6 × active parameters, the routed experts a token does not
use excluded, plus attention), and each row trains for as many of its own steps as that buys.
FLOPs do not move with the load on a shared machine; wall seconds do (a row's wall time is in
the table, with the load it ran at). Each row's schedule is its config's, compressed to its
steps: warmup keeps its share of the run. Every run is `python main.py` in a subprocess with
its own workdir under --workdir (a killed run resumes from its last checkpoint), on one
prepared data dir per tokenizer size under --data_root (shards and tokenizer built once, JAX's
compile cache there).

The table: mean ± standard deviation over seeds of the final val bits/char (the whole val
split), the greedy preview's longest run of one token (max over seeds), tokens seen, training
FLOPs, median wall seconds of training (`done: N steps in Ts`), and the machine's load average
over the runs (wall seconds are comparable only at equal load; FLOPs always are).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)

# AdamW's one rate for every parameter: 3e-3 was the best of #3's sweep on the tiny model
# (configs/base.py's 6e-4 is GPT-2 small's rate; a 3M model takes a higher one).
ADAMW = {'optim.name': 'adamw', 'optim.lr': 3e-3}
CTX256 = {'model.seq_len': 256, 'train.per_device_batch': 8}     # same tokens per step

# name -> (config, overrides). The first row is the reference the budget is counted in.
ROWS = {
    'gpt2-muon': ('configs/tiny.py:gpt2', {}),
    'gpt2-adamw': ('configs/tiny.py:gpt2', ADAMW),
    'tiny': ('configs/tiny.py', {}),      # the CPU demo as it is (Llama-style, Muon + Adam)
    'llama-muon': ('configs/modern.py:tiny', {}),
    'llama-adamw': ('configs/modern.py:tiny', ADAMW),
    'moe-muon': ('configs/moe.py', {}),
    'moe-adamw': ('configs/moe.py', ADAMW),
    'deepseek-muon': ('configs/moe.py:deepseek', {}),
    'deepseek-adamw': ('configs/moe.py:deepseek', ADAMW),
    'gpt2-muon-ctx256': ('configs/tiny.py:gpt2', CTX256),
    'llama-muon-ctx256': ('configs/modern.py:tiny', CTX256),
    'gpt2-adamw-6e-4': ('configs/tiny.py:gpt2', {'optim.name': 'adamw', 'optim.lr': 6e-4}),
    # cheap general tricks, each alone on the GPT-2 + Muon row
    'gpt2-muon-tied': ('configs/tiny.py:gpt2', {'model.tie_embeddings': True}),
    'gpt2-muon-zero-init': ('configs/tiny.py:gpt2', {'model.residual_init': 0.0}),
    'gpt2-muon-to-zero': ('configs/tiny.py:gpt2', {'optim.min_lr_ratio': 0.0}),
    'gpt2-muon-wsd': ('configs/tiny.py:gpt2', {'optim.schedule': 'wsd', 'optim.min_lr_ratio': 0.0}),
    'gpt2-muon-relu2': ('configs/tiny.py:gpt2', {'model.mlp': 'relu2'}),
    # QK-norm (Qwen3 / modded-nanogpt): each head's query and key RMS-normed before attention
    'gpt2-muon-qknorm': ('configs/tiny.py:gpt2', {'model.qk_norm': True}),
    'llama-muon-qknorm': ('configs/modern.py:tiny', {'model.qk_norm': True}),
    # logits = 15·tanh(logits / 15): modded-nanogpt's "softer softcap" record lowered Gemma 2's
    # 30 to 15 at 124M (structure that helps small models most); at 3M, 30 would barely bite
    'gpt2-muon-softcap': ('configs/tiny.py:gpt2', {'model.logit_softcap': 15.0}),
    'gpt2-muon-batch8': ('configs/tiny.py:gpt2', {'train.per_device_batch': 8}),
    'gpt2-muon-batch32': ('configs/tiny.py:gpt2', {'train.per_device_batch': 32}),
    # a 4k vocabulary: a cheaper head (8.6 vs 11.7 MFLOPs/token), 1.24 vs 1.41 chars/token
    'gpt2-muon-v4000': ('configs/tiny.py:gpt2', {'tokenizer.vocab_size': 4000}),
    # candidates for the CPU demo, to be run against gpt2-muon at --budget 1500 (tiny.py's run)
    'demo-wsd-relu2': ('configs/tiny.py:gpt2', {'optim.schedule': 'wsd', 'optim.decay_fraction': 0.5,
                                           'optim.min_lr_ratio': 0.0, 'model.mlp': 'relu2'}),
    'demo-wsd-relu2-v4000': ('configs/tiny.py:gpt2', {
        'optim.schedule': 'wsd', 'optim.decay_fraction': 0.5, 'optim.min_lr_ratio': 0.0,
        'model.mlp': 'relu2', 'tokenizer.vocab_size': 4000}),
    'demo-llama-wsd': ('configs/modern.py:tiny', {'optim.schedule': 'wsd', 'optim.decay_fraction': 0.5,
                                                 'optim.min_lr_ratio': 0.0}),
    'demo-llama-v4000': ('configs/modern.py:tiny', {'tokenizer.vocab_size': 4000}),
    'demo-llama-wsd-v4000': ('configs/modern.py:tiny', {
        'optim.schedule': 'wsd', 'optim.decay_fraction': 0.5, 'optim.min_lr_ratio': 0.0,
        'tokenizer.vocab_size': 4000}),
    # configs/tiny.py's recipe with one change, at its own budget (--budget 1401.557 = its 1360
    # steps; these rows were measured at 1442.78, its 1400 steps then, its Muon rate 0.02)
    'tiny-batch8': ('configs/tiny.py', {'train.per_device_batch': 8}),    # twice the steps
    'tiny-muon-0.04': ('configs/tiny.py', {'optim.muon_lr': 0.04}),
    'tiny-muon-0.02': ('configs/tiny.py', {'optim.muon_lr': 0.02}),
    'tiny-muon-0.01': ('configs/tiny.py', {'optim.muon_lr': 0.01}),
    'tiny-muon-0.005': ('configs/tiny.py', {'optim.muon_lr': 0.005}),
    # the schedule's tail on the demo: hold the peak, then decay linearly to 0 over the last half
    'tiny-wsd': ('configs/tiny.py', {'optim.schedule': 'wsd', 'optim.decay_fraction': 0.5,
                                     'optim.min_lr_ratio': 0.0}),
}
REFERENCE = 'configs/tiny.py:gpt2'
CHILDREN: set = set()      # the training processes running now (ended with the bench)


def _stop(signum, frame):
  for proc in list(CHILDREN):
    proc.kill()
  raise SystemExit(f'recipes.py: stopped by signal {signum}; finished runs are in results.jsonl')


def load_config(spec: str, overrides: dict):
  """The ConfigDict of `configs/X.py[:arg]` with `overrides` ({'a.b': value}) applied."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('recipe_config', os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if isinstance(value, str) and \
        not isinstance(node[leaf], str) else value
  return config


def parse_sets(items: list[str]) -> dict:
  """--set a.b=v (repeatable) -> {'a.b': 'v'}; the value is typed by the config field."""
  out = {}
  for item in items:
    key, sep, value = item.partition('=')
    if not sep:
      raise SystemExit(f'recipes.py: error: --set {item}: expected key=value')
    out[key] = {'true': True, 'false': False}.get(value.lower(), value)
  return out


def flops_per_step(config, vocab: int) -> tuple[float, int]:
  """(training FLOPs of one step, tokens of one step) of `config` on one device."""
  import jax
  from zhgpt_jax import model as model_lib
  cfg = model_lib.model_config(config.model, vocab)
  abstract = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  tokens = config.train.per_device_batch * config.train.grad_accum * config.model.seq_len
  return model_lib.flops_per_token(cfg, abstract) * tokens, tokens


def data_dir(args, config) -> str:
  """The prepared data of config's tokenizer size: --set data.cache_dir, or one per size."""
  return config.data.cache_dir or os.path.join(args.data_root, f'v{config.tokenizer.vocab_size}')


def prepare(args, config) -> int:
  """Prepares (or finds) the data dir of config's tokenizer size; returns the vocab size."""
  from zhgpt_jax import tokenizer as tok_lib
  root = data_dir(args, config)
  tok = os.path.join(root, 'tokenizer')
  if not os.path.isfile(os.path.join(root, 'val', 'meta.json')):
    flags = dict(args.sets, **{'data.cache_dir': root,
                               'tokenizer.vocab_size': config.tokenizer.vocab_size})
    subprocess.run([sys.executable, 'main.py', 'prepare', '--config', REFERENCE,
                    '--workdir', os.path.join(args.workdir, 'prepare'),
                    *[f'--config.{k}={v}' for k, v in flags.items()]],
                   cwd=ROOT, check=True, env=_env(args))
  return tok_lib.load_tokenizer(tok).get_vocab_size()


def _env(args) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  if args.threads:
    # One XLA CPU thread per run: --jobs runs share the cores without spin-waiting on each other.
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false '
                        f'intra_op_parallelism_threads={args.threads}').strip()
  return env


def plan(args, name: str, seed: int, budget_flops: float, vocabs: dict) -> dict:
  """One run: its flags, steps and the key that identifies its result."""
  spec, overrides = ROWS[name]
  config = load_config(spec, {**args.sets, **overrides})
  step_flops, tokens = flops_per_step(config, vocabs[config.tokenizer.vocab_size])
  steps = max(2, round(budget_flops / step_flops))
  warmup = min(steps - 1, max(1, round(config.optim.warmup_steps * steps / config.train.steps)))
  flags = {**args.sets, **overrides}
  flags.update({'seed': seed, 'train.steps': steps, 'optim.warmup_steps': warmup,
                'train.eval_every': steps, 'train.ckpt_every': max(steps // 2, 1),
                'train.keep': 1, 'train.log_every': max(steps // 10, 1),
                'data.cache_dir': data_dir(args, config)})
  # The resolved config is part of the key: a config file edited since keeps no stale result.
  key = hashlib.sha256(json.dumps([spec, sorted(flags.items(), key=str), config.to_json()],
                                  default=str).encode()).hexdigest()[:16]
  return dict(row=name, config=spec, seed=seed, steps=steps, tokens=steps * tokens,
              flops=steps * step_flops, key=key, flags=flags)


def train(args, run: dict) -> dict:
  """Trains one run (resuming its workdir) and returns its result record."""
  workdir = os.path.join(args.workdir, 'runs', f'{run["row"]}-s{run["seed"]}-{run["key"]}')
  cmd = [sys.executable, 'main.py', '--config', run['config'], '--workdir', workdir]
  cmd += [f'--config.{k}={v}' for k, v in run['flags'].items()]
  load0, clock = os.getloadavg()[0], timing.Timer().start()
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  # The run's output goes to a file, not a pipe: a run outlives a bench killed with -9.
  with open(workdir + '.log', 'w', encoding='utf-8') as log, \
      subprocess.Popen(cmd, cwd=ROOT, env=_env(args), stdout=log, stderr=subprocess.STDOUT) as proc:
    CHILDREN.add(proc)
    proc.wait()
    CHILDREN.discard(proc)
  wall = clock.elapsed()
  with open(workdir + '.log', encoding='utf-8', errors='replace') as f:
    stdout = f.read()
  if proc.returncode:
    raise RuntimeError(f'{run["row"]} seed {run["seed"]} failed (exit {proc.returncode}), '
                       f'{workdir}.log:\n{stdout[-3000:]}')
  done = re.search(r'done: (\d+) steps in (\d+)s', stdout)
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')]
  val = [r for r in records if r['split'] == 'val' and r['step'] == run['steps']]
  if not val:
    raise RuntimeError(f'{run["row"]} seed {run["seed"]}: no val record at step {run["steps"]} '
                       f'in {workdir}/metrics.jsonl')
  val = val[-1]
  sample = [r for r in records if r['split'] == 'sample' and r['step'] == run['steps']]
  return dict(run, flags=None, bpc=val['bpc'], loss=val['loss'],
              longest=sample[-1]['greedy_longest_run'] if sample else None,
              train_s=float(done[2]) if done else None, wall_s=wall,
              load=(load0 + os.getloadavg()[0]) / 2, resumed='resuming from' in stdout)


def table(results: list[dict], names: list[str]) -> str:
  lines = ['| row | config + overrides | seeds | val bits/char | greedy longest run | steps | '
           'tokens | TFLOP | train s (median) | load |',
           '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for name in names:
    rs = [r for r in results if r['row'] == name]
    if not rs:
      continue
    spec, overrides = ROWS[name]
    bpc = [r['bpc'] for r in rs]
    sd = statistics.stdev(bpc) if len(bpc) > 1 else 0.0
    over = ''.join(f' {k}={v}' for k, v in overrides.items())
    train_s = [r['train_s'] for r in rs if r['train_s']]
    longest = [r['longest'] for r in rs if r['longest'] is not None]
    lines.append(
        f'| {name} | `{spec}`{over} | {len(rs)} | {statistics.mean(bpc):.3f} ± {sd:.3f} | '
        f'{int(max(longest)) if longest else "-"} | {rs[0]["steps"]} | {rs[0]["tokens"]:,} | '
        f'{rs[0]["flops"] / 1e12:.3g} | {statistics.median(train_s) if train_s else 0:.0f} | '
        f'{statistics.mean(r["load"] for r in rs):.1f} |')
  return '\n'.join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rows', default=','.join(ROWS), help='comma-separated names of ROWS')
  p.add_argument('--seeds', type=int, default=3, help='seeds per row')
  p.add_argument('--first_seed', type=int, default=0,
                 help='the seeds are first_seed .. first_seed + seeds - 1 (more seeds of a row '
                      'later, or split between two machines)')
  p.add_argument('--budget', type=float, default=300,
                 help='FLOPs per run, in steps of configs/tiny.py:gpt2')
  p.add_argument('--jobs', type=int, default=1, help='runs trained at the same time')
  p.add_argument('--threads', type=int, default=0,
                 help='XLA CPU threads per run (0 = XLA default: all cores)')
  p.add_argument('--workdir', default=os.path.join(ROOT, 'runs', 'recipes'))
  p.add_argument('--data_root', default='')
  p.add_argument('--set', dest='sets', action='append', default=[], metavar='KEY=VALUE',
                 help='a config override for every row (e.g. data.corpus=DIR), repeatable')
  p.add_argument('--dry_run', action='store_true',
                 help="print the plan and the finished runs' table; train nothing")
  args = p.parse_args(argv)
  args.sets = parse_sets(args.sets)
  signal.signal(signal.SIGTERM, _stop)
  args.data_root = args.data_root or os.path.join(args.workdir, 'data')
  names = [n for n in args.rows.split(',') if n]
  unknown = [n for n in names if n not in ROWS]
  if unknown:
    p.error(f'unknown rows {unknown}; known: {", ".join(ROWS)}')
  os.makedirs(args.workdir, exist_ok=True)

  vocabs = {}
  for name in names:
    spec, overrides = ROWS[name]
    config = load_config(spec, {**args.sets, **overrides})
    if config.tokenizer.vocab_size not in vocabs:
      vocabs[config.tokenizer.vocab_size] = (
          config.tokenizer.vocab_size if args.dry_run else prepare(args, config))
  ref_config = load_config(REFERENCE, args.sets)
  if ref_config.tokenizer.vocab_size not in vocabs:
    vocabs[ref_config.tokenizer.vocab_size] = ref_config.tokenizer.vocab_size if args.dry_run \
        else prepare(args, ref_config)
  ref_flops, _ = flops_per_step(ref_config, vocabs[ref_config.tokenizer.vocab_size])
  budget = args.budget * ref_flops
  print(f'budget: {budget / 1e12:.3g} TFLOP ({budget:.0f} FLOPs) per run ({args.budget:g} steps '
        f'of {REFERENCE}'
        + ''.join(f' {k}={v}' for k, v in args.sets.items()) + ')')

  results_path = os.path.join(args.workdir, 'results.jsonl')
  done = {}
  if os.path.exists(results_path):
    for line in open(results_path, encoding='utf-8'):
      r = json.loads(line)
      done[r['key']] = r
  # Rows in groups of --jobs: a group's first seeds run together and compile the steps; its
  # later seeds then load them from the compile cache instead of compiling them again.
  groups = [names[i:i + args.jobs] for i in range(0, len(names), args.jobs)]
  runs = [plan(args, n, s, budget, vocabs) for g in groups
          for s in range(args.first_seed, args.first_seed + args.seeds) for n in g]
  todo = [r for r in runs if r['key'] not in done]
  print(f'{len(runs)} runs, {len(runs) - len(todo)} done before, {len(todo)} to train')
  for r in todo if args.dry_run else ():
    print(f'  {r["row"]} seed {r["seed"]}: {r["steps"]} steps, {r["tokens"]:,} tokens')
  if args.dry_run:   # and the table of what is finished so far
    print(table([done[r['key']] for r in runs if r['key'] in done], names))
    return

  def one(run):
    try:
      result = train(args, run)
    except RuntimeError as e:   # one broken row must not stop the others; rerun retries it
      print(e, flush=True)
      return None
    with open(results_path, 'a', encoding='utf-8') as f:   # one line per finished run
      f.write(json.dumps(result) + '\n')
    print(f'{run["row"]} seed {run["seed"]}: val {result["bpc"]:.4f} bits/char, longest run '
          f'{result["longest"]}, {result["train_s"]}s training (load {result["load"]:.1f})',
          flush=True)
    return result

  with ThreadPoolExecutor(max_workers=args.jobs) as pool:
    new = [r for r in pool.map(one, todo) if r is not None]
  results = [done[r['key']] for r in runs if r['key'] in done] + new
  print(table(results, names))


if __name__ == '__main__':
  main()
