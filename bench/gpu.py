"""The GPU checks in one call: cuDNN attention against XLA, then train-step tokens/s and MFU.

  python bench/gpu.py [--batch 16] [--steps 20] [--peak_tflops 989]
  python bench/gpu.py --smoke      # the same code at toy sizes on any device

1. Attention: for GPT-2 small (configs/base.py) and the Llama-style model (configs/modern.py)
   in bfloat16 at seq 1024, the same parameters and batch through `attention=cudnn` and
   `attention=xla`: relative error ||cudnn - xla|| / ||xla|| of the logits, of the whole
   gradient, and of the worst gradient leaf (leaves whose norm is below 1e-3 of the largest
   are skipped: e.g. the key bias, whose true gradient is zero). Pass: all <= 1e-2.
2. Throughput: the real pmapped train step (`train.make_train_step`: the config's optimizer)
   of each preset at seq 1024, bf16, cuDNN attention, vocab 50257 (padded to 50304),
   `--batch` sequences per device, random tokens; 3 untimed steps (compilation), then
   `--steps` timed. MFU = model.flops_per_token × tokens/s / (devices × peak), with the peak
   a dense bf16 rate (989 TFLOP/s: H100/H200 SXM).

A table of both is printed last; copy it into BENCHMARKS.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import base, modern  # pylint: disable=wrong-import-position
from zhgpt_jax import model as model_lib  # pylint: disable=wrong-import-position
from zhgpt_jax import loss as loss_lib  # pylint: disable=wrong-import-position
from zhgpt_jax import parallel, train  # pylint: disable=wrong-import-position
from zhgpt_jax.config import validate  # pylint: disable=wrong-import-position
import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)

_BATCH = flags.DEFINE_integer('batch', 16, 'Sequences per device in the throughput runs.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed train steps per preset.')
_PEAK = flags.DEFINE_float('peak_tflops', 989.0, 'Dense bf16 peak per device, TFLOP/s.')
_VOCAB = flags.DEFINE_integer('vocab', 50257, 'Vocabulary (GPT-2 small: 50257 -> 124M).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Toy sizes, to check the script on a CPU.')

TOLERANCE = 1e-2


def preset_configs(smoke: bool) -> dict:
  """name -> config: GPT-2 small and modern at seq 1024 (toy sizes with --smoke)."""
  configs = {'gpt2-small': base.get_config(), 'modern-small': modern.get_config()}
  for c in configs.values():
    c.tokenizer.vocab_size = _VOCAB.value
    c.model.update(seq_len=1024, dtype='bfloat16', attention='cudnn')
    c.train.update(per_device_batch=_BATCH.value, grad_accum=1, short_seq_steps=0)
    if smoke:
      c.tokenizer.vocab_size = 1000
      c.model.update(n_layer=2, n_head=2, n_kv_head=0, d_model=64, seq_len=64)
      c.train.update(per_device_batch=2, steps=10)
      c.optim.warmup_steps = 2
    validate(c)
  return configs


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def compare_attention(config) -> dict:
  """Relative errors of logits and gradients, cudnn against xla, on one shared batch."""
  cfgs = {}
  for impl in ('cudnn', 'xla'):
    model_cfg = config.model.copy_and_resolve_references()
    model_cfg.attention = impl
    cfgs[impl] = model_lib.model_config(model_cfg, config.tokenizer.vocab_size)
  params = model_lib.init_params(cfgs['xla'], jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  seq = cfgs['xla'].seq_len
  tokens = rng.integers(0, cfgs['xla'].real_vocab_size, (4, seq + 1), dtype=np.int32)
  batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:])}
  out = {}
  for impl, cfg in cfgs.items():
    model = model_lib.GPT(cfg)
    logits = jax.jit(lambda p, x, m=model: m.apply({'params': p}, x)[0])(params, batch['inputs'])
    grads = jax.jit(jax.grad(lambda p, m=model: loss_lib.loss_fn(p, m, batch, None, False)[0]))(
        params)
    out[impl] = (np.asarray(logits.astype(jnp.float32)), jax.tree.map(np.asarray, grads))
  (lc, gc), (lx, gx) = out['cudnn'], out['xla']
  leaves_c, leaves_x = jax.tree.leaves(gc), jax.tree.leaves(gx)
  norms = [np.linalg.norm(x) for x in leaves_x]
  worst = max(rel_err(c, x) for c, x, n in zip(leaves_c, leaves_x, norms) if n >= 1e-3 * max(norms))
  flat = lambda leaves: np.concatenate([np.ravel(x) for x in leaves])
  return dict(logits=rel_err(lc, lx), grads=rel_err(flat(leaves_c), flat(leaves_x)),
              worst_leaf=worst)


def throughput(config, steps: int, peak: float) -> dict:
  """tokens/s and MFU of the real train step of `config` on all local devices."""
  cfg = model_lib.model_config(config.model, config.tokenizer.vocab_size)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  strategy = parallel.make(config.get('parallel'))
  optimizer, step_fn = train.make_train_step(config, cfg, strategy)
  devices, b, seq = jax.local_device_count(), config.train.per_device_batch, cfg.seq_len
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(2):
    w = rng.integers(0, cfg.real_vocab_size, (devices, 1, b, seq + 1), dtype=np.int32)
    batches.append({'inputs': w[..., :-1], 'targets': w[..., 1:]})
  state = strategy.put_state(train.new_state(optimizer, params, 0))
  with timing.Timer() as compile_t:
    for i in range(3):
      state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready(metrics)
  compile_s = compile_t.seconds
  with timing.Timer() as t:
    for i in range(steps):
      state, metrics = step_fn(state, batches[i % 2])
    jax.block_until_ready((state, metrics))
  seconds = t.seconds
  tokens_s = steps * devices * b * seq / seconds
  flops_tok = model_lib.flops_per_token(cfg, params)
  return dict(params=model_lib.count_params(params), ms=1e3 * seconds / steps,
              tokens_s=tokens_s, mfu=flops_tok * tokens_s / (devices * peak),
              compile_s=compile_s, loss=float(strategy.to_host(metrics['loss'])))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  devices = jax.devices()
  print(f'jax {jax.__version__}; {len(devices)} x {devices[0].device_kind} '
        f'({jax.default_backend()})', flush=True)
  if jax.default_backend() != 'gpu' and not _SMOKE.value:
    raise app.UsageError('no GPU here: cuDNN attention needs one (use --smoke to check the script)')
  configs = preset_configs(_SMOKE.value)
  checks, runs = {}, {}
  for name, config in configs.items():
    if jax.default_backend() != 'gpu':   # model_config would run xla for cudnn: nothing to compare
      print(f'{name}: cudnn vs xla skipped: cuDNN attention needs a GPU', flush=True)
      continue
    checks[name] = compare_attention(config)
    print(f'{name}: cudnn vs xla {checks[name]}', flush=True)
  for name, config in configs.items():
    runs[name] = throughput(config, _STEPS.value, _PEAK.value * 1e12)
    print(f'{name}: {runs[name]}', flush=True)

  print('\n| attention check (bf16) | logits rel. err | grads rel. err | worst leaf | pass |')
  print('|---|---:|---:|---:|---|')
  for name in configs:
    if name not in checks:
      print(f'| {name} cudnn vs xla | | | | skipped: no GPU |')
      continue
    e = checks[name]
    ok = max(e.values()) <= TOLERANCE
    print(f'| {name} cudnn vs xla | {e["logits"]:.2e} | {e["grads"]:.2e} | '
          f'{e["worst_leaf"]:.2e} | {"yes" if ok else "NO"} |')
  c0 = next(iter(configs.values()))
  print(f'\n| train step, seq {c0.model.seq_len}, bf16, {c0.train.per_device_batch}/device x '
        f'{jax.local_device_count()} | params | ms/step | tokens/s | MFU (peak {_PEAK.value:g} '
        f'TFLOP/s) | compile s |')
  print('|---|---:|---:|---:|---:|---:|')
  for name, r in runs.items():
    print(f'| {name} ({configs[name].optim.name}) | {r["params"]:,} | {r["ms"]:.1f} | '
          f'{r["tokens_s"]:,.0f} | {r["mfu"]:.1%} | {r["compile_s"]:.1f} |')


if __name__ == '__main__':
  app.run(main)
