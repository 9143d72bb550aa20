"""Memory per device, pmap against fsdp=8, for the GPT-2 presets and a 7B-shaped model.

  PYTHONPATH=. python bench/memory.py [--compile small,medium] [--batch 1] [--devices 8]
  PYTHONPATH=. python bench/memory.py --moe [--devices 8]

--moe instead: the train state per device of MoE models (configs/moe.py:deepseek, and the same
preset at DeepSeekMoE-16B's shape) under layouts with and without expert parallelism
(`parallel.expert`), from the shapes and the placement rule; for the CPU preset also
allocated in place (`strategy.init_state`) and read back (`parallel.bytes_per_device`).

For each model: the bytes of parameters + AdamW state one device holds (from the shapes and
the placement rule, `parallel.Sharded.spec`; nothing is allocated), and, for the models named
in --compile, the compiled train step's memory per device as XLA reports it
(`compiled.memory_analysis()`: arguments + outputs - donated + temporaries) -- the real step
of `train.make_train_step`, lowered from abstract shapes at --batch sequences of seq_len per
device, float32, no remat. Models not compiled get "state + gradients" from the shapes only
(activations excluded), marked as such. "fits 8 x 80 GB" compares the per-device figure with
80 GB (GiB-free decimal GB, as GPU memory is sold). Runs on the CPU: --devices simulated
devices (XLA_FLAGS is set here when not given).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)

MODELS = {   # name: config.model overrides (GPT-2 vocab 50257; the 7B shape is Llama-2 7B's)
    'small': dict(n_layer=12, n_head=12, d_model=768, seq_len=1024),
    'medium': dict(n_layer=24, n_head=16, d_model=1024, seq_len=1024),
    'large': dict(n_layer=36, n_head=20, d_model=1280, seq_len=1024),
    'xl': dict(n_layer=48, n_head=25, d_model=1600, seq_len=1024),
    '7b': dict(n_layer=32, n_head=32, d_model=4096, seq_len=2048, mlp='swiglu',
               position='rope', norm='rmsnorm', bias=False, tie_embeddings=False),
}
VOCAB = {'7b': 32000}
GPU_BYTES = 80e9


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--compile', default='small,medium',
                 help='models whose train step is compiled for memory_analysis()')
  p.add_argument('--batch', type=int, default=1, help='sequences per device per step')
  p.add_argument('--devices', type=int, default=8, help='simulated devices (fsdp size)')
  p.add_argument('--moe', action='store_true', help='MoE state per device by layout instead')
  return p.parse_args(argv)


# DeepSeekMoE 16B (arXiv 2401.06066): 28 layers, d 2048, 16 heads, 64 routed experts of width
# 1408 (6 active) + 2 shared, the first layer dense (width 10944), vocab 102400, context 4096.
MOE_MODELS = {
    'configs/moe.py:deepseek': {},
    'DeepSeekMoE-16B shape': dict(n_layer=28, n_head=16, d_model=2048, seq_len=4096,
                                  mlp_hidden=10944, moe=dict(expert_hidden=1408)),
}
MOE_VOCAB = {'DeepSeekMoE-16B shape': 102400}


def moe_layouts(n: int) -> dict:
  """Layout name -> config.parallel overrides (None: pmap) for n devices."""
  e = 4 if n % 4 == 0 else n
  return {'pmap': None, f'fsdp={n}': dict(data=1, fsdp=n, expert=1),
          f'data={n // e} x expert={e}': dict(data=n // e, fsdp=1, expert=e),
          f'fsdp={n // e} x expert={e}': dict(data=1, fsdp=n // e, expert=e),
          f'expert={n}': dict(data=1, fsdp=1, expert=n)}


def moe_main(args):
  """The MoE table: params + optimizer state per device, by model and layout."""
  import jax
  import numpy as np
  from configs import moe as moe_configs
  from zhgpt_jax import model as model_lib, optim, parallel, train
  from zhgpt_jax.config import default_config
  n = jax.device_count()
  layouts = moe_layouts(n)
  print(f'jax {jax.__version__}, {jax.default_backend()}, {n} devices; float32 params + the '
        "preset's optimizer state (Muon + Adam)", flush=True)
  rows = []
  for name, overrides in MOE_MODELS.items():
    c = moe_configs.get_config('deepseek')
    c.model.update({k: v for k, v in overrides.items() if k != 'moe'})
    c.model.moe.update(overrides.get('moe', {}))
    c.train.steps = 1000
    cfg = model_lib.model_config(c.model, MOE_VOCAB.get(name, 8000))
    opt = optim.make_optimizer(c.optim, c.train.steps)
    fresh = lambda r, cfg=cfg, opt=opt: train.new_state(opt, model_lib.init_params(cfg, r), 0)
    state = jax.eval_shape(fresh, jax.random.PRNGKey(0))
    held = {k: state[k] for k in ('params', 'opt_state')}
    params = model_lib.count_params(state['params'])
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held))
    experts = sum(x.size * x.dtype.itemsize for k, x in jax.tree_util.tree_leaves_with_path(held)
                  if parallel.is_expert_stack(k))
    cells = []
    for layout, sizes in layouts.items():
      if sizes is None:
        per_device = whole
      else:
        p = default_config().parallel
        p.update(strategy='fsdp', **sizes)
        strategy = parallel.make(p)
        per_device = 0
        for k, x in jax.tree_util.tree_leaves_with_path(held):
          split = [a for a in jax.tree.leaves(tuple(strategy.spec(x.shape, k))) if a]
          ways = int(np.prod([strategy.mesh.shape[a] for a in split]))
          per_device += x.size * x.dtype.itemsize // ways
        if name == 'configs/moe.py:deepseek':   # allocated in place: the same bytes
          real = strategy.init_state(fresh, jax.random.PRNGKey(0))
          got = parallel.bytes_per_device({k: real[k] for k in ('params', 'opt_state')})
          assert got == per_device, (layout, got, per_device)
      cells.append(per_device)
    rows.append((name, params, experts / whole, whole, cells))
    print(name, params, cells, flush=True)
  print('\n| model | params | expert stacks | ' + ' | '.join(layouts) + ' |')
  print('|---|---:|---:|' + '---:|' * len(layouts))
  for name, params, share, whole, cells in rows:
    unit, scale = ('MB', 1e6) if whole < 1e9 else ('GB', 1e9)
    shown = [f'{c / scale:,.2f} {unit}' + (f' (1/{whole / c:.1f})' if c < whole else '')
             for c in cells]
    print(f'| {name} | {params / 1e6:,.1f}M | {share:.0%} | ' + ' | '.join(shown) + ' |')


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={args.devices}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.moe:
    return moe_main(args)
  import jax
  from zhgpt_jax import model as model_lib, optim, parallel, train
  from zhgpt_jax.config import default_config
  n = args.devices
  assert jax.device_count() == n, f'{jax.device_count()} devices; set XLA_FLAGS yourself'
  compiled_models = [m for m in args.compile.split(',') if m]

  def setup(name):
    c = default_config('small')
    c.model.update(MODELS[name])
    c.train.update(steps=1000, loss_chunk=0)
    cfg = model_lib.model_config(c.model, VOCAB.get(name, 50257))
    opt = optim.make_optimizer(c.optim, c.train.steps)
    step_of = lambda s: train.make_train_step(c, cfg, s)[1]   # the step training runs
    fresh = lambda r: train.new_state(opt, model_lib.init_params(cfg, r), 0)
    return cfg, step_of, jax.eval_shape(fresh, jax.random.PRNGKey(0))

  mesh = jax.make_mesh((1, n, 1), parallel.MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  fsdp, pmap = parallel.Sharded(mesh), parallel.Pmap()

  def held(state, strategy):
    """Bytes of params + optimizer state on one device, from shapes and the rule."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(
        {k: state[k] for k in ('params', 'opt_state')}):
      split = strategy is fsdp and strategy.spec(x.shape, path) != jax.sharding.PartitionSpec()
      total += x.size * x.dtype.itemsize // (n if split else 1)
    return total

  def compiled_bytes(step_of, state, cfg, strategy):
    b, t = args.batch, cfg.seq_len
    if strategy is pmap:
      lead = lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype)
      state_in = jax.tree.map(lead, state)
      batch = jax.ShapeDtypeStruct((n, 1, b, t), jax.numpy.int32)
    else:
      state_in = strategy.restore_target(state)
      batch_sharding = jax.sharding.NamedSharding(mesh, strategy.batch_spec(3))
      batch = jax.ShapeDtypeStruct((1, n * b, t), jax.numpy.int32, sharding=batch_sharding)
    with timing.Timer() as t:
      compiled = step_of(strategy).lower(state_in, {'inputs': batch, 'targets': batch}).compile()
      m = compiled.memory_analysis()
    if m is None:
      return None, t.seconds
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return dict(peak=peak, temp=m.temp_size_in_bytes), t.seconds

  gb = lambda x: f'{x / 1e9:,.2f}'

  def table_row(r):
    cells, fits = [], []
    for key in ('pmap', 'fsdp'):
      step = r[f'{key}_step']
      if step is not None:
        need, shown = step['peak'], f'{gb(step["peak"])} (compiled; {gb(step["temp"])} temp)'
      else:   # state + a gradient the size of the params' share
        need = r[f'{key}_state'] * 4 // 3
        shown = f'≥ {gb(need)} (shapes: state + grads, no activations)'
      cells += [gb(r[f'{key}_state']), shown]
      fits.append(f'{key} {"yes" if need <= GPU_BYTES else "no"}')
    return (f'| {r["name"]} | {r["params"] / 1e6:,.0f}M | {r["seq"]} | ' + ' | '.join(cells)
            + f' | {", ".join(fits)} |')

  print(f'jax {jax.__version__}, {jax.default_backend()}, {n} devices; batch {args.batch} '
        'sequence(s) of seq_len per device; float32 params + AdamW', flush=True)
  rows = []
  for name in MODELS:
    cfg, step_of, state = setup(name)
    row = dict(name=name, params=model_lib.count_params(state['params']), seq=cfg.seq_len)
    for strategy in (pmap, fsdp):
      key = strategy.name
      row[f'{key}_state'] = held(state, strategy)
      row[f'{key}_step'] = None
      if name in compiled_models:
        row[f'{key}_step'], secs = compiled_bytes(step_of, state, cfg, strategy)
        print(f'  {name} {key}: compiled in {secs:.0f}s', flush=True)
    rows.append(table_row(row))
    print(rows[-1], flush=True)

  print(f'\n| model | params | seq | pmap: state/device GB | pmap: step/device GB | '
        f'fsdp={n}: state/device GB | fsdp={n}: step/device GB | fits {n} x 80 GB |')
  print('|---|---|---|---|---|---|---|---|')
  print('\n'.join(rows))

if __name__ == '__main__':
  main()
