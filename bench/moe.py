"""MoE benchmark: does a train step's cost follow top-k (sparse) or the expert count (dense)?

  PYTHONPATH=. python bench/moe.py --config configs/moe.py [--experts 8,16,32,64]
      [--steps 3] [--rounds 3] [--rows 4096] [--width 256]

1. Grouped matmuls, the choice behind model.moe.grouped='auto': one routed SwiGLU (forward and
   backward) over --rows token-assignments (rows/2 tokens, top-2) of width --width, experts of
   width --width, at each expert count: jax.lax.ragged_dot on the rows sorted by expert, the
   same rows in fixed-capacity [E, C, d] blocks with one batched matmul (capacity factor 1.0,
   uniform random routing), and every expert on every token (dense). Median of --rounds × 2
   calls each.
2. Train steps: the model of --config (any --config.a.b=v applies) with n_routed = each of
   --experts, top_k = 2 and the expert width held at its value for the first count, so the
   active parameters (and FLOPs/token) stay equal while the total grows with the expert
   count. Sparse (the backend's grouped='auto') and dense dispatch run side by side: every
   round times --steps steps of each configuration in turn, and the median round is
   reported with its ratio to the first expert count. The pmapped train step of train.py on
   the local devices, random tokens, the config's optimizer.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)
from zhgpt_jax import model as model_lib  # pylint: disable=wrong-import-position
from zhgpt_jax import moe, parallel, train  # pylint: disable=wrong-import-position
from zhgpt_jax.config import validate  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/moe.py', 'Config file.')
_EXPERTS = flags.DEFINE_list('experts', ['8', '16', '32', '64'], 'Routed expert counts.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed train steps per configuration and round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds.')
_ROWS = flags.DEFINE_integer('rows', 4096, 'Token-assignments of the grouped-matmul test '
                             '(0: skip it).')
_WIDTH = flags.DEFINE_integer('width', 256, 'd_model and expert width of the grouped test.')


def _median_ms(fn, args, rounds: int, calls: int = 2) -> float:
  def run():
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
  return 1e3 * statistics.median(timing.interleaved([run], rounds)[0]) / calls


def grouped_matmuls(experts: list[int], rows: int, width: int, rounds: int) -> None:
  k, n = 2, rows // 2
  print(f'\n1. One routed SwiGLU, forward + backward: {rows} rows ({n} tokens x top-{k}), '
        f'd = expert width = {width}, float32, {jax.default_backend()}; ms per call\n')
  print('| experts | ragged_dot | capacity [E, C, d] | dense (every expert) |')
  print('|---:|---:|---:|---:|')
  for e in experts:
    keys = jax.random.split(jax.random.PRNGKey(e), 5)
    x = jax.random.normal(keys[0], (n, width))
    ws = [0.05 * jax.random.normal(keys[i], (e, width, width)) for i in (1, 2, 3)]
    idx = jax.vmap(lambda key: jax.random.choice(key, e, (k,), replace=False))(
        jax.random.split(keys[4], n))
    gate = jnp.full((n, k), 0.5)
    c = moe.capacity(n, e, k, 1.0)

    # Routing as arguments, not constants: XLA would sort a constant at compile time.
    forms = (lambda x, ws, gate, idx: moe.ragged_experts(x, gate, idx, *ws),
             lambda x, ws, gate, idx: moe.capacity_experts(x, gate, idx, *ws, c)[0],
             lambda x, ws, gate, idx: moe.dense_experts(x, gate, idx, *ws))
    ms = [_median_ms(jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=(0, 1))),
                     (x, ws, gate, idx), rounds) for f in forms]
    print(f'| {e} | ' + ' | '.join(f'{m:,.1f}' for m in ms) + ' |', flush=True)


def train_steps(config, experts: list[int], steps: int, rounds: int) -> None:
  base = model_lib.model_config(config.model, config.tokenizer.vocab_size)
  hidden = base.moe.expert_hidden
  t = config.train
  devices = jax.local_device_count()
  tokens_per_step = devices * t.grad_accum * t.per_device_batch * base.seq_len
  rng = np.random.default_rng(config.seed)
  windows = rng.integers(0, base.real_vocab_size, (devices, t.grad_accum, t.per_device_batch,
                                                    base.seq_len + 1), dtype=np.int32)
  batch = {'inputs': windows[..., :-1], 'targets': windows[..., 1:]}
  runs = {}
  for e in experts:
    for dispatch in ('sparse', 'dense'):
      c = config.copy_and_resolve_references()
      c.model.moe.update(n_routed=e, top_k=2, expert_hidden=hidden, dispatch=dispatch)
      cfg = model_lib.model_config(c.model, c.tokenizer.vocab_size)
      params = model_lib.init_params(cfg, jax.random.PRNGKey(config.seed))
      strategy = parallel.make(c.get('parallel'))
      optimizer, step_fn = train.make_train_step(c, cfg, strategy)
      state = strategy.put_state(train.new_state(optimizer, params, config.seed))
      with timing.Timer() as compile_t:
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
      runs[e, dispatch] = dict(step=step_fn, state=state, times=[], params=params, cfg=cfg,
                               compile_s=compile_t.seconds)
  print(f'\n2. Train steps: {base.n_layer} layers, d_model {base.d_model}, '
        f'{len(base.moe_layers())} MoE layers, top-2, expert width {hidden}, '
        f'{base.moe.n_shared} shared; {tokens_per_step:,} tokens/step; optimizer '
        f'{config.optim.name}; grouped={moe.grouped_impl(base.moe.grouped)} on '
        f'{jax.default_backend()} (capacity factor {base.moe.capacity_factor}); '
        f'{steps} steps x {rounds} rounds, median\n')
  for _ in range(rounds):
    for run in runs.values():
      with timing.Timer() as t:
        for _ in range(steps):
          run['state'], metrics = run['step'](run['state'], batch)
        jax.block_until_ready(run['state'])
      run['times'].append(t.seconds / steps)
      run['dropped'] = float(np.asarray(metrics['moe_dropped'])[0])
  print('| routed experts | params | active | sparse ms/step | x sparse@first | dropped | '
        'dense ms/step | x dense@first | dense / sparse |')
  print('|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
  ms = {key: 1e3 * statistics.median(run['times']) for key, run in runs.items()}
  first = experts[0]
  for e in experts:
    run = runs[e, 'sparse']
    n, active = (model_lib.count_params(run['params']),
                 model_lib.active_params(run['cfg'], run['params']))
    print(f'| {e} | {n / 1e6:.2f}M | {active / 1e6:.2f}M | {ms[e, "sparse"]:,.0f} | '
          f'{ms[e, "sparse"] / ms[first, "sparse"]:.2f}x | {run["dropped"]:.1%} | '
          f'{ms[e, "dense"]:,.0f} | {ms[e, "dense"] / ms[first, "dense"]:.2f}x | '
          f'{ms[e, "dense"] / ms[e, "sparse"]:.2f}x |')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  validate(config)
  if config.model.mlp != 'moe':
    raise app.UsageError(f'--config must be an MoE model (model.mlp=moe), not {config.model.mlp}')
  experts = [int(e) for e in _EXPERTS.value]
  print(f'jax {jax.__version__} on {jax.local_device_count()} {jax.default_backend()} device(s)')
  if _ROWS.value:
    grouped_matmuls(experts, _ROWS.value, _WIDTH.value, _ROUNDS.value)
  train_steps(config, experts, _STEPS.value, _ROUNDS.value)


if __name__ == '__main__':
  app.run(main)
