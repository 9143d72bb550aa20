"""Memory per device, pmap against fsdp=8, for the GPT-2 presets and a 7B-shaped model.

  PYTHONPATH=. python bench/memory.py [--compile small,medium] [--batch 1] [--devices 8]

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
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count={args.devices}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
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
    for x in jax.tree.leaves({k: state[k] for k in ('params', 'opt_state')}):
      split = strategy is fsdp and strategy.spec(x.shape) != jax.sharding.PartitionSpec()
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
      batch = jax.ShapeDtypeStruct((1, n * b, t), jax.numpy.int32,
                                   sharding=jax.sharding.NamedSharding(mesh, strategy.batch_spec(3)))
    t0 = time.perf_counter()
    compiled = step_of(strategy).lower(state_in, {'inputs': batch, 'targets': batch}).compile()
    m = compiled.memory_analysis()
    if m is None:
      return None, time.perf_counter() - t0
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)
    return dict(peak=peak, temp=m.temp_size_in_bytes), time.perf_counter() - t0

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
