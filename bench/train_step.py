"""Train-step benchmark: our pmapped step against an eager PyTorch GPT-2 of the same size.

  PYTHONPATH=. python bench/train_step.py --config configs/tiny.py:gpt2 [--config.model.d_model=128]
      [--steps 10] [--warmup 2] [--rounds 3] [--loader_batches 200]

Both sides train the model of `--config` (any `--config.a.b=v` override applies) at its batch
(train.per_device_batch × local devices × train.grad_accum sequences of model.seq_len) and
optimizer (AdamW, or Muon + AdamW with torch.optim.Muon on the same matrices), float32, from
the same weights: ours copies into `bench/torch_gpt.py`, and the two must agree on the
parameter count and the first loss. The vocab is the config's tokenizer.vocab_size, padded as
the model pads it; no tokenizer or corpus is needed. Each side runs `--warmup` untimed steps
(compilation, allocator), then `--rounds` interleaved groups of `--steps` timed steps (ours,
torch, ours, torch, ...); ours blocks on its results at the end of each group. The step time of
a side is its median group; ratio = torch ms / our ms per round, and the median of those is
reported, since the CPU is shared and absolute numbers are noisy. MFU = model.flops_per_token ×
tokens/s / peak, where peak is `train.measure_peak_flops()` (a float32 matmul on this device;
the best of three at the start and one before each round). CPU s/step is the process's CPU time
per step (all its threads, spin-waits included): on a shared machine it shows the work done
where wall time also shows the neighbours. The grain loader's batches/s is measured alone over
a synthetic shard directory (--loader_tokens random tokens, worker_count 0) and set against our
steps/s: it must be at least 10×, so that the loader never limits training.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from bench import timing, torch_gpt  # pylint: disable=wrong-import-position
from zhgpt_jax import data as data_lib  # pylint: disable=wrong-import-position
from zhgpt_jax import loss as loss_lib  # pylint: disable=wrong-import-position
from zhgpt_jax import model as model_lib  # pylint: disable=wrong-import-position
from zhgpt_jax import optim, parallel, train  # pylint: disable=wrong-import-position
from zhgpt_jax.config import validate  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py:gpt2', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per group.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps per side before timing.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved (ours, torch) timing rounds.')
_LOADER_BATCHES = flags.DEFINE_integer('loader_batches', 200, 'Timed loader batches.')
_LOADER_TOKENS = flags.DEFINE_integer('loader_tokens', 4_000_000, 'Synthetic shard tokens.')

GPT2_SWITCHES = dict(position='learned', mlp='gelu', norm='layernorm', bias=True, dropout=0.0)


def torch_from_params(cfg: model_lib.GPTConfig, params) -> torch_gpt.GPT:
  """The PyTorch reference holding a copy of our parameters (q, k, v fused as GPT-2's c_attn)."""
  model = torch_gpt.GPT(cfg.vocab_size, cfg.seq_len, cfg.n_layer, cfg.n_head, cfg.d_model,
                        cfg.mlp_hidden, cfg.norm_eps, cfg.tie_embeddings)
  t = lambda x: torch.from_numpy(np.array(x, np.float32))
  dense = lambda p: (t(p['kernel']).T, t(p['bias']))   # Flax [in, out] -> torch [out, in]
  sd = {'wte.weight': t(params['wte']['embedding']), 'wpe.weight': t(params['wpe']['embedding']),
        'ln_f.weight': t(params['ln_f']['scale']), 'ln_f.bias': t(params['ln_f']['bias'])}
  if not cfg.tie_embeddings:
    sd['lm_head.weight'] = t(params['lm_head']).T       # [D, V] -> torch [V, D]
  for i in range(cfg.n_layer):
    p, pre = params[f'h_{i}'], f'h.{i}.'
    for ln in ('ln_1', 'ln_2'):
      sd[pre + ln + '.weight'], sd[pre + ln + '.bias'] = t(p[ln]['scale']), t(p[ln]['bias'])
    qkv = [dense(p['attn'][n]) for n in 'qkv']
    sd[pre + 'attn.c_attn.weight'] = torch.cat([w for w, _ in qkv])
    sd[pre + 'attn.c_attn.bias'] = torch.cat([b for _, b in qkv])
    for ours, theirs in (('attn/o', 'attn.c_proj'), ('mlp/fc', 'mlp.c_fc'),
                         ('mlp/proj', 'mlp.c_proj')):
      a, b = ours.split('/')
      sd[pre + theirs + '.weight'], sd[pre + theirs + '.bias'] = dense(p[a][b])
  model.load_state_dict(sd, strict=True)
  return model


def loader_batches_per_s(config, devices: int, n: int, n_tokens: int) -> float:
  """Batches/s of `data.train_loader` alone over a synthetic split of the step's batch shape."""
  t, m = config.train, config.model
  with tempfile.TemporaryDirectory() as tmp:
    split = os.path.join(tmp, 'train')
    os.makedirs(split)
    rng = np.random.default_rng(0)
    rng.integers(0, config.tokenizer.vocab_size, n_tokens, dtype=np.uint16).tofile(
        os.path.join(split, 'shard_00000.bin'))
    with open(os.path.join(split, 'meta.json'), 'w', encoding='utf-8') as f:
      f.write(f'{{"dtype": "uint16", "tokens": {n_tokens}}}')
    it = iter(data_lib.train_loader(
        split, m.seq_len, per_device_batch=t.per_device_batch, grad_accum=t.grad_accum,
        local_devices=devices, seed=0, process_index=0, process_count=1, workers=0,
        prefetch=config.data.prefetch))
    for _ in range(5):
      next(it)
    with timing.Timer() as timer:
      for _ in range(n):
        batch = next(it)
    seconds = timer.seconds
    assert batch['inputs'].shape == (devices, t.grad_accum, t.per_device_batch, m.seq_len)
  return n / seconds


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  validate(config)
  torch.set_num_threads(os.cpu_count())
  cfg = model_lib.model_config(config.model, config.tokenizer.vocab_size)
  other = {k: getattr(cfg, k) for k, v in GPT2_SWITCHES.items() if getattr(cfg, k) != v}
  if other or cfg.n_kv_head != cfg.n_head or cfg.dtype != 'float32':
    raise app.UsageError(f'the PyTorch reference is GPT-2 in float32; this config has {other}, '
                         f'n_kv_head={cfg.n_kv_head}, dtype={cfg.dtype}')

  t = config.train
  devices = jax.local_device_count()
  accum, b, seq = t.grad_accum, t.per_device_batch, cfg.seq_len
  tokens_per_step = devices * accum * b * seq
  params = model_lib.init_params(cfg, jax.random.PRNGKey(config.seed))
  n_params = model_lib.count_params(params)
  flops_tok = model_lib.flops_per_token(cfg, params)
  schedule = optim.schedule(config.optim, t.steps)
  strategy = parallel.make(config.get('parallel'))
  optimizer, step_fn = train.make_train_step(config, cfg, strategy)

  ref = torch_from_params(cfg, params)
  n_torch = sum(p.numel() for p in ref.parameters())
  assert n_torch == n_params, f'parameter counts differ: ours {n_params:,}, torch {n_torch:,}'
  o = config.optim
  ref_opt = torch_gpt.make_optimizers(ref, o)
  muon_schedule = optim.schedule(o, t.steps, o.muon_lr)
  opt_name = (f'Muon lr {o.muon_lr} + AdamW lr {o.lr}' if o.name == 'muon'
              else f'AdamW lr {o.lr}')

  rng = np.random.default_rng(config.seed)
  windows = [rng.integers(0, cfg.real_vocab_size, (devices, accum, b, seq + 1), dtype=np.int32)
             for _ in range(4)]
  ours_batches = [{'inputs': w[..., :-1], 'targets': w[..., 1:]} for w in windows]
  torch_batches = [(torch.from_numpy(w[..., :-1].reshape(-1, seq)).long(),
                    torch.from_numpy(w[..., 1:].reshape(-1, seq)).long()) for w in windows]

  # Same architecture, not just the same size: both see the first batch with the same weights.
  first = jax.tree.map(lambda x: x[0, 0], ours_batches[0])
  ours_loss, _ = loss_lib.loss_fn(params, model_lib.GPT(cfg), first, jax.random.PRNGKey(0), False)
  with torch.no_grad():
    _, torch_loss = ref(torch_batches[0][0][:b], torch_batches[0][1][:b])
  np.testing.assert_allclose(float(ours_loss), float(torch_loss), rtol=1e-4)

  peak = max(train.measure_peak_flops() for _ in range(3))
  print(f'model: n_layer={cfg.n_layer} n_head={cfg.n_head} d_model={cfg.d_model} '
        f'seq_len={seq} vocab={cfg.vocab_size} (padded from {cfg.real_vocab_size}); '
        f'{n_params:,} params in both; {flops_tok / 1e6:.1f} MFLOPs/token; first loss '
        f'ours {float(ours_loss):.5f}, torch {float(torch_loss):.5f}')
  print(f'batch: {b} per device x {devices} devices x {accum} accumulation x {seq} = '
        f'{tokens_per_step:,} tokens/step; {opt_name} b=({o.b1}, {o.b2}) wd '
        f'{o.weight_decay} clip {o.grad_clip}; float32')
  print(f'jax {jax.__version__} on {devices} {jax.devices()[0].platform} device(s); torch '
        f'{torch.__version__} with {torch.get_num_threads()} threads; peak (float32 1024^3 '
        f'matmul) {peak / 1e9:.1f} GFLOP/s')

  state = strategy.put_state(train.new_state(optimizer, params, config.seed))
  ours_step, torch_step = [0], [0]

  def run_ours(n: int) -> tuple[float, float]:
    nonlocal state
    metrics = None
    with timing.Timer() as t:
      for _ in range(n):
        state, metrics = step_fn(state, ours_batches[ours_step[0] % len(ours_batches)])
        ours_step[0] += 1
      jax.block_until_ready((state, metrics))
    return t.seconds, t.cpu_seconds

  def run_torch(n: int) -> tuple[float, float]:
    with timing.Timer() as t:
      for _ in range(n):
        x, y = torch_batches[torch_step[0] % len(torch_batches)]
        lrs = dict(adam=float(schedule(torch_step[0])), muon=float(muon_schedule(torch_step[0])))
        torch_gpt.train_step(ref, ref_opt, x, y, lrs, o.grad_clip)
        torch_step[0] += 1
    return t.seconds, t.cpu_seconds

  compile_s, _ = run_ours(1)
  run_ours(max(0, _WARMUP.value - 1))
  run_torch(_WARMUP.value)
  print(f'ours: first step (compilation) {compile_s:.1f}s')
  rounds, n = [], _STEPS.value
  for r in range(_ROUNDS.value):
    # Other jobs come and go: the peak is re-measured each round and the best one kept.
    peak = max(peak, train.measure_peak_flops())
    (ours_s, ours_cpu), (torch_s, torch_cpu) = run_ours(n), run_torch(n)
    rounds.append((1e3 * ours_s / n, 1e3 * torch_s / n, ours_cpu / n, torch_cpu / n))
    print(f'round {r + 1}: ours {rounds[-1][0]:.1f} ms/step, torch {rounds[-1][1]:.1f} ms/step, '
          f'ratio {torch_s / ours_s:.2f}x; CPU s/step ours {ours_cpu / n:.2f}, torch '
          f'{torch_cpu / n:.2f}', flush=True)

  ours_ms, torch_ms, ours_cpu, torch_cpu = (statistics.median(col) for col in zip(*rounds))
  ratio = statistics.median(r[1] / r[0] for r in rounds)
  loader_bps = loader_batches_per_s(config, devices, _LOADER_BATCHES.value, _LOADER_TOKENS.value)
  loader_ratio = loader_bps / (1e3 / ours_ms)

  def row(name, ms, cpu):
    tps = tokens_per_step / (ms / 1e3)
    return f'| {name} | {ms:,.1f} | {tps:,.0f} | {flops_tok * tps / peak:.1%} | {cpu:.2f} |'

  print(f'\n{_STEPS.value} timed steps x {_ROUNDS.value} rounds per side, medians; '
        f'peak {peak / 1e9:.1f} GFLOP/s\n')
  print('| train step | ms/step | tokens/s | MFU | CPU s/step |')
  print('|---|---:|---:|---:|---:|')
  print(row('ours (JAX, pmapped)', ours_ms, ours_cpu))
  print(row('PyTorch eager (bench/torch_gpt.py)', torch_ms, torch_cpu))
  print(f'| **ours / torch** (median of per-round ratios) | | **{ratio:.2f}x** | | |')
  print(f'\nloader: {loader_bps:,.1f} batches/s (worker_count 0) vs {1e3 / ours_ms:.2f} '
        f'steps/s: {loader_ratio:,.0f}x '
        + ('(OK, >= 10x)' if loader_ratio >= 10 else '(TOO SLOW: < 10x, the loader limits '
                                                      'training)'))


if __name__ == '__main__':
  app.run(main)
