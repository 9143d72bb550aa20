"""The training run: state, the pmapped train and eval steps, and the loop around them.

`train_and_evaluate(config, workdir)` is the whole job: prepare data if needed, build or
restore the state, step, log, evaluate, checkpoint, and stop cleanly on SIGTERM/SIGINT.
Batches are dicts of [devices, ...] arrays: 'inputs' and 'targets' (int32), optionally
'weights' (loss mask), 'segment_ids' and 'positions' (packed SFT rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zhgpt_jax import checkpoint as ckpt_lib
from zhgpt_jax import data as data_lib
from zhgpt_jax import model as model_lib
from zhgpt_jax import moe as moe_lib
from zhgpt_jax import optim, parallel, sources
from zhgpt_jax.config import UserError, check_paths, validate
from zhgpt_jax.metrics import MetricsWriter

AXIS = parallel.AXIS


# ----------------------------------------------------------------------------- the steps

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_cross_entropy(x_NxD, head_DxV, labels_N, chunk: int):
  """Per-token cross-entropy of logits x @ head (float32), never holding all [N, V] logits.

  A `lax.scan` over chunks of `chunk` tokens computes each chunk's logits, log-sum-exp and
  target logit; the backward pass recomputes the chunk's logits from the saved log-sum-exp.
  Equal to softmax cross-entropy of the full logits; it saves the [N, V] buffers (66 MB for
  a 2,048-token step at an 8k vocab, 3.3 GB for GPT-2 small) and the time spent moving them.
  """
  return _ce_forward(x_NxD, head_DxV, labels_N, chunk)[0]


def _chunks(chunk, *arrays):
  """Zero-pads the leading axis to a multiple of `chunk` and splits it into [C, chunk, ...]."""
  n = arrays[0].shape[0]
  pad = -n % chunk
  return [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:])
          for a in arrays]


def _ce_forward(x_NxD, head_DxV, labels_N, chunk):
  w_DxV = head_DxV.astype(x_NxD.dtype)

  def body(_, xs):
    x_CxD, label_C = xs
    logits_CxV = jnp.dot(x_CxD, w_DxV, preferred_element_type=jnp.float32)
    lse_C = jax.nn.logsumexp(logits_CxV, axis=-1)
    target_C = jnp.take_along_axis(logits_CxV, label_C[:, None], axis=-1)[:, 0]
    return None, (lse_C - target_C, lse_C)

  _, (ce, lse) = jax.lax.scan(body, None, tuple(_chunks(chunk, x_NxD, labels_N)))
  n = x_NxD.shape[0]
  return ce.reshape(-1)[:n], (x_NxD, head_DxV, labels_N, lse.reshape(-1)[:n])


def _ce_backward(chunk, res, g_N):
  x_NxD, head_DxV, labels_N, lse_N = res
  w_DxV = head_DxV.astype(x_NxD.dtype)

  def body(dw_DxV, xs):
    x_CxD, label_C, lse_C, g_C = xs
    logits_CxV = jnp.dot(x_CxD, w_DxV, preferred_element_type=jnp.float32)
    onehot_CxV = jax.nn.one_hot(label_C, logits_CxV.shape[-1], dtype=jnp.float32)
    dlogits_CxV = ((jnp.exp(logits_CxV - lse_C[:, None]) - onehot_CxV) * g_C[:, None])
    dlogits_CxV = dlogits_CxV.astype(x_CxD.dtype)
    dx_CxD = jnp.dot(dlogits_CxV, w_DxV.T, preferred_element_type=jnp.float32)
    dw_DxV = dw_DxV + jnp.dot(x_CxD.T, dlogits_CxV, preferred_element_type=jnp.float32)
    return dw_DxV, dx_CxD.astype(x_CxD.dtype)

  xs = _chunks(chunk, x_NxD, labels_N, lse_N, g_N.astype(jnp.float32))
  dw_DxV, dx = jax.lax.scan(body, jnp.zeros(head_DxV.shape, jnp.float32), tuple(xs))
  dx_NxD = dx.reshape(-1, x_NxD.shape[-1])[:x_NxD.shape[0]]
  return dx_NxD, dw_DxV.astype(head_DxV.dtype), None


chunked_cross_entropy.defvjp(_ce_forward, _ce_backward)


def token_cross_entropy(model: model_lib.GPT, params, batch: dict, rng, train: bool,
                        chunk: int = 0):
  """[B, L] float32 cross-entropy of the batch's targets, and the model's aux outputs.

  chunk > 0 applies the output head inside `chunked_cross_entropy`; 0 builds full logits.
  """
  out_BxLx_, aux = model.apply(
      {'params': params}, batch['inputs'], positions_BxL=batch.get('positions'),
      segment_ids_BxL=batch.get('segment_ids'), train=train,
      rngs=None if rng is None else {'dropout': rng}, hidden=chunk > 0)
  if chunk <= 0:
    return optax.softmax_cross_entropy_with_integer_labels(out_BxLx_, batch['targets']), aux
  b, l, d = out_BxLx_.shape
  ce_N = chunked_cross_entropy(out_BxLx_.reshape(b * l, d), aux.pop('head_DxV'),
                               batch['targets'].reshape(b * l), chunk)
  return ce_N.reshape(b, l), aux


def loss_fn(params, model: model_lib.GPT, batch: dict, rng, train: bool, moe_cfg=None,
            chunk: int = 0):
  """Mean token cross-entropy (float32) plus MoE auxiliary losses; returns (total, metrics)."""
  ce_BxL, aux = token_cross_entropy(model, params, batch, rng, train, chunk)
  weights_BxL = batch.get('weights')
  if weights_BxL is None:
    ce = jnp.mean(ce_BxL)
  else:
    ce = jnp.sum(ce_BxL * weights_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)
  metrics = {'loss': ce}
  total = ce
  if 'moe_balance' in aux:
    aux_weight = moe_cfg.aux_weight if moe_cfg.balance == 'aux' else 0.0
    total = total + aux_weight * aux['moe_balance'] + moe_cfg.z_weight * aux['moe_z']
    metrics.update({k: aux[k] for k in ('moe_balance', 'moe_z', 'moe_load', 'moe_dropped')})
  return total, metrics


def make_train_step(model, optimizer, lr_schedule, moe_cfg, loss_chunk: int = 0) -> Callable:
  """The pmapped update: grads accumulated over micro-batches, averaged over all devices.

  A step whose loss or gradient norm is not finite leaves params and optimizer state as
  they were (metrics['skipped'] = 1); the step counter still advances with the data.
  """

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.fold_in(state['rng'], state['step']),
                             jax.lax.axis_index(AXIS))
    accum = batch['inputs'].shape[0]
    grad_fn = jax.grad(loss_fn, has_aux=True)

    def micro(grads, xs):
      i, mb = xs
      g, m = grad_fn(state['params'], model, mb, jax.random.fold_in(rng, i), True, moe_cfg,
                     loss_chunk)
      return jax.tree.map(jnp.add, grads, g), m

    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    grads, metrics = jax.lax.scan(micro, zeros, (jnp.arange(accum), batch))
    grads = jax.lax.pmean(jax.tree.map(lambda g: g / accum, grads), AXIS)
    metrics = jax.lax.pmean(jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics), AXIS)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if model.cfg.moe_balance == 'bias' and 'moe_load' in metrics:
      params = moe_lib.balance_params(params, model.cfg.moe_layers(), metrics['moe_load'],
                                      moe_cfg.bias_rate)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics.update(grad_norm=grad_norm, lr=lr_schedule(state['step']), skipped=1.0 - ok)
    new_state = dict(step=state['step'] + 1, rng=state['rng'],
                     params=keep(params, state['params']),
                     opt_state=keep(opt_state, state['opt_state']))
    return new_state, metrics

  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))


def make_eval_step(model, loss_chunk: int = 0) -> Callable:
  """The pmapped eval: summed weighted cross-entropy and weight over all devices."""

  def step(params, batch):
    ce_BxL, _ = token_cross_entropy(model, params, batch, None, False, loss_chunk)
    w_BxL = batch['weights']
    return jax.lax.psum(jnp.sum(ce_BxL * w_BxL), AXIS), jax.lax.psum(jnp.sum(w_BxL), AXIS)

  return jax.pmap(step, axis_name=AXIS)


def config_train_step(config, cfg: model_lib.GPTConfig) -> tuple[Any, Callable]:
  """The optimizer and the pmapped train step `config` asks for (optim, train.steps, loss_chunk)."""
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  return optimizer, make_train_step(model_lib.GPT(cfg), optimizer,
                                    optim.schedule(config.optim, config.train.steps),
                                    config.model.moe, config.train.loss_chunk)


def evaluate(eval_step, params_rep, batches: Iterator[dict], chars_per_token: float | None):
  """Val loss (nats/token), perplexity and, given chars/token, bits per character."""
  total, count = 0.0, 0.0
  for batch in batches:
    s, n = eval_step(params_rep, batch)
    total += float(s[0])
    count += float(n[0])
  loss = total / max(count, 1.0)
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)), 'tokens': count}
  if chars_per_token:
    out['bpc'] = loss / math.log(2) / chars_per_token
  return out


# ----------------------------------------------------------------------------- the task

@dataclasses.dataclass
class Task:
  """What the loop trains on: an iterator of train batches and ways to evaluate."""
  train_loader: Any                       # grain DataLoader of [devices, accum, B, T] dicts
  eval_batches: Callable[[], Iterator]    # a fresh pass over the val split
  chars_per_token: float | None = None    # of the val split, for bits per character
  extra_eval: Callable | None = None      # (cfg, params) -> dict of extra val metrics


def pretraining_task(config, data_dir: str) -> Task:
  t, m = config.train, config.model
  devices, pi, pc = jax.local_device_count(), jax.process_index(), jax.process_count()
  weights = sources.source_weights(config.data.corpus)
  loader = data_lib.train_loader(
      os.path.join(data_dir, 'train'), m.seq_len, per_device_batch=t.per_device_batch,
      grad_accum=t.grad_accum, local_devices=devices, seed=config.seed, process_index=pi,
      process_count=pc, workers=config.data.loader_workers, prefetch=config.data.prefetch,
      weights=weights)
  if pi == 0:
    tokens = devices * pc * t.grad_accum * t.per_device_batch * m.seq_len
    for line in data_lib.epoch_report(os.path.join(data_dir, 'train'), weights, tokens, t.steps):
      print(line, flush=True)
  val_dir = os.path.join(data_dir, 'val')
  data_lib.TokenWindows(val_dir, m.seq_len)   # an empty val split is an error now, not at step 1000
  meta = _read_json(os.path.join(val_dir, 'meta.json'))
  cpt = meta['characters'] / meta['tokens'] if meta.get('tokens') else None
  return Task(
      train_loader=loader,
      eval_batches=lambda: data_lib.eval_batches(
          val_dir, m.seq_len, batch=t.eval_batch, local_devices=devices, process_index=pi,
          process_count=pc, max_batches=t.eval_max_batches),
      chars_per_token=cpt)


def _read_json(path):
  import json
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def short_context(batch: dict, seq_len: int) -> dict:
  """Cuts every row of [..., B, T] into T/seq_len rows of seq_len (same tokens per step)."""
  def cut(x):
    *lead, b, t = x.shape
    return x.reshape(*lead, b * (t // seq_len), seq_len)
  return {k: cut(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step."""
  config: Any
  workdir: str
  tokenizer_dir: str
  tokenizer: Any
  cfg: model_lib.GPTConfig
  model: model_lib.GPT
  optimizer: Any
  schedule: Any
  task: Task | None = None
  train_iter: Any = None        # the train loader's iterator (its position is checkpointed)


def build(config, workdir: str, with_data: bool = True, training: bool = True) -> Run:
  """Validates the config and paths, prepares data (process 0), and builds model and optimizer.

  Run.config is `config` resolved against init_from (pretrained.resolve): the model shape
  and tokenizer of the model the run starts from. `training=False` (eval) skips the checks
  only training needs (init_from, a val split).
  """
  from zhgpt_jax import pretrained, shards, tokenizer as tok_lib
  check_paths(config, workdir, training)
  config = pretrained.resolve(config)
  validate(config)
  parallel.initialize(config.dist)
  tokenizer_dir = pretrained.init_tokenizer_dir(config)
  if config.task == 'sft' and tokenizer_dir and \
      not tok_lib.has_chatml(tok_lib.load_tokenizer(tokenizer_dir)):
    if jax.process_index() == 0:
      pretrained.chatml_copy(tokenizer_dir, workdir)
    parallel.sync('chatml')
    tokenizer_dir = os.path.join(workdir, 'tokenizer')
  data_dir = None
  if with_data and config.task == 'pretrain':
    if jax.process_index() == 0:
      shards.prepare(config, workdir)
    parallel.sync('prepare')
    data_dir = shards.data_dir(config, workdir)
    tokenizer_dir = tokenizer_dir or os.path.join(data_dir, 'tokenizer')
  if not tokenizer_dir:
    tokenizer_dir = os.path.join(workdir, 'tokenizer')
  tokenizer = tok_lib.load_tokenizer(tokenizer_dir)
  model_cfg = config.model
  if model_cfg.attention == 'cudnn' and jax.default_backend() != 'gpu':
    print('model.attention=cudnn needs a GPU; using xla on this', jax.default_backend())
    model_cfg = model_cfg.copy_and_resolve_references()
    model_cfg.attention = 'xla'
  cfg = model_lib.model_config(model_cfg, tokenizer.get_vocab_size())
  schedule = optim.schedule(config.optim, config.train.steps)
  run = Run(config, workdir, tokenizer_dir, tokenizer, cfg, model_lib.GPT(cfg),
            optim.make_optimizer(config.optim, config.train.steps), schedule)
  if with_data:
    if config.task == 'sft':
      from zhgpt_jax import sft
      run.task = sft.make_task(config, workdir, run)
    else:
      run.task = pretraining_task(config, data_dir)
  return run


def initial_params(run: Run, rng):
  """Fresh params, or those of config.init_from (a workdir of ours, or hf:PATH)."""
  if not run.config.init_from:
    return model_lib.init_params(run.cfg, rng)
  from zhgpt_jax import pretrained
  return jax.tree.map(jnp.asarray, pretrained.initial_params(
      run.config, run.cfg, run.tokenizer.get_vocab_size()))


def new_state(optimizer, params, seed: int) -> dict:
  """The train state: a plain dict pytree, as checkpointed."""
  return dict(step=jnp.int32(0), rng=jax.random.PRNGKey(seed + 1), params=params,
              opt_state=optimizer.init(params))


def measure_peak_flops(n: int = 1024, reps: int = 10) -> float:
  """FLOP/s of a float32 n×n matmul on the first device: the 'peak' for MFU on a CPU."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    y = f(x)
  y.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


# ----------------------------------------------------------------------------- the loop

class _StopFlag:
  """Set by SIGTERM/SIGINT: the loop finishes its step, saves, and exits cleanly."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    # Processes of a multi-process run must stop at the same step: there jax's preemption
    # service catches SIGTERM and picks that step (parallel.preempted); a handler here would
    # stop one process alone and leave the others waiting in a collective.
    for sig in (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ():
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains to config.train.steps (resuming from the workdir's checkpoint); returns the last eval.

  Every exit, by return or by exception, finishes the checkpoint save in flight (or drops a
  failed one cleanly) before it leaves.
  """
  run = build(config, workdir)
  config = run.config
  from zhgpt_jax import tokenizer as tok_lib
  tok_hash = tok_lib.tokenizer_hash(run.tokenizer_dir)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep)
  writer = None
  try:
    state = _start_state(config, workdir, run, ckpt, tok_hash)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0,
                           start_step=int(state['step']))
    return _loop(config, workdir, run, state, ckpt, writer, tok_hash)
  except BaseException:
    ckpt.abandon()   # waits for (or cleanly drops) a save in flight; never raises
    if writer is not None:
      writer.close(plot=False)
    raise


def _start_state(config, workdir: str, run: Run, ckpt, tok_hash: str) -> dict:
  """The host train state, restored from the newest intact checkpoint or fresh; also starts
  run.train_iter (at the restored position) and writes the run files."""
  t = config.train
  is_main = jax.process_index() == 0
  run.train_iter = iter(run.task.train_loader)
  if ckpt.latest_step() is not None:
    saved = ckpt_lib.load_config(workdir)
    abstract = jax.eval_shape(lambda: new_state(
        run.optimizer, model_lib.init_params(run.cfg, jax.random.PRNGKey(0)), config.seed))

    def resume(step):
      ckpt_lib.check_compatible(saved, config, ckpt.meta(step)['tokenizer_hash'], tok_hash)
      return ckpt.restore(step, abstract, run.train_iter)[0]

    latest, state = ckpt.load(resume, on_fallback=ckpt.move_aside)
    if latest >= t.steps:
      print(f'{workdir}: already trained to step {latest} (train.steps={t.steps}); '
            'raise --config.train.steps to continue')
    elif is_main:
      print(f'resuming from step {latest} in {ckpt.directory}')
  else:
    state = new_state(run.optimizer, initial_params(run, jax.random.PRNGKey(config.seed)),
                      config.seed)
  if is_main:
    ckpt_lib.save_run_files(workdir, config, run.tokenizer_dir)
  return state


def _loop(config, workdir: str, run: Run, state, ckpt, writer, tok_hash: str) -> dict:
  """The steps, evals and saves of `train_and_evaluate`, from the state's step."""
  t = config.train
  is_main = jax.process_index() == 0
  global_batch = t.per_device_batch * jax.device_count() * t.grad_accum
  tokens_per_step = global_batch * config.model.seq_len
  train_iter = run.train_iter
  n_params = model_lib.count_params(state['params'])
  flops_tok = model_lib.flops_per_token(run.cfg, state['params'])
  peak = t.peak_flops or measure_peak_flops()
  if is_main:
    routed = (f', routed {model_lib.routed_flops_per_token(run.cfg) / 1e6:.1f} MFLOPs/token'
              if run.cfg.moe_layers() else '')
    print(f'model: {n_params:,} params ({model_lib.active_params(run.cfg, state["params"]):,} '
          f'active), {flops_tok / 1e6:.1f} MFLOPs/token (active{routed}), vocab '
          f'{run.cfg.real_vocab_size} (padded {run.cfg.vocab_size})')
    print(f'batch: {t.per_device_batch} per device x {jax.device_count()} devices x '
          f'{t.grad_accum} accumulation = {global_batch} sequences of {config.model.seq_len} '
          f'= {tokens_per_step:,} tokens/step; peak {peak / 1e12:.3f} TFLOP/s per device')

  state = parallel.replicate(state)
  train_step = make_train_step(run.model, run.optimizer, run.schedule, config.model.moe,
                               t.loss_chunk)
  eval_step = make_eval_step(run.model, t.loss_chunk)
  start = int(np.asarray(state['step'].addressable_data(0))[0])

  def do_eval(step, state):
    params = parallel.unreplicate(state['params'])
    result = evaluate(eval_step, state['params'], run.task.eval_batches(),
                      run.task.chars_per_token)
    if run.task.extra_eval is not None:
      result.update(run.task.extra_eval(run.cfg, params))
    writer.scalars(step, 'val', {k: v for k, v in result.items() if k != 'tokens'})
    if is_main:
      shown = ', '.join(f'{k} {v:.4f}' for k, v in result.items() if k != 'tokens')
      print(f'\nstep {step}: val {shown}')
      texts, longest = sample_prompt(run, params)
      for name, text in texts.items():
        print(f'  {name}: {config.train.prompt}{text}')
        writer.text(step, name, config.train.prompt + text)
      if texts:
        print(f'  longest run of one token in the greedy continuation: {longest}')
        writer.scalars(step, 'sample', {'greedy_longest_run': longest})
    return result

  def do_save(step, state, result=None):
    host_state = parallel.unreplicate(state)
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(host_state['params'])):
      raise UserError(f'step {step}: parameters are not finite; not saving over the last good '
                      'checkpoint')
    meta = dict(step=step, tokenizer_hash=tok_hash, val=result)
    ckpt.save(step, host_state, train_iter, meta,
              val_loss=None if result is None else result['loss'])

  from tqdm import tqdm
  bar = tqdm(total=t.steps, initial=start, disable=not is_main, desc='train', dynamic_ncols=True)
  last_eval, pending, nonfinite = None, None, 0
  t0, window_steps, run_start = time.perf_counter(), 0, time.perf_counter()
  step = start
  with _StopFlag() as stop, contextlib.closing(bar):   # an error line starts on a line of its own
    while step < t.steps:
      batch = next(train_iter)
      if step < t.short_seq_steps:
        batch = short_context(batch, t.short_seq_len)
      state, metrics = train_step(state, batch)
      step += 1
      if jax.process_count() == 1:
        ckpt.poll()   # a failed background save stops the run here, not at the next save
      window_steps += 1
      # Read the previous step's metrics only now, so the device never waits on the host.
      if pending is not None:
        nonfinite = _check(pending, nonfinite, t.max_nonfinite, writer)
      pending = (step, metrics)
      if step % t.log_every == 0 or step == t.steps:
        nonfinite = _check(pending, nonfinite, t.max_nonfinite, writer)
        pending = None
        host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], metrics)
        dt = time.perf_counter() - t0
        tps = window_steps * tokens_per_step / dt
        logged = dict(loss=host['loss'], lr=host['lr'], grad_norm=host['grad_norm'],
                      tokens_per_s=tps, mfu=tps * flops_tok / (peak * jax.device_count()))
        if 'moe_balance' in host:
          logged.update(moe_balance=host['moe_balance'], moe_z=host['moe_z'],
                        moe_dropped=host['moe_dropped'])
          for layer, load in zip(run.cfg.moe_layers(), host['moe_load']):
            logged[f'moe_max_min_l{layer}'] = min(moe_lib.load_ratio(load), 1e9)
            logged.update({f'moe_load_l{layer}_e{e}': v for e, v in enumerate(load)})
        writer.scalars(step, 'train', logged)
        bar.set_postfix(loss=f'{host["loss"]:.3f}', lr=f'{host["lr"]:.2e}', tok_s=f'{tps:,.0f}')
        t0, window_steps = time.perf_counter(), 0
      bar.update(1)
      if step % t.eval_every == 0 or step == t.steps:
        last_eval = do_eval(step, state)
      if step % t.ckpt_every == 0 or step == t.steps:
        do_save(step, state, last_eval if last_eval and step % t.eval_every == 0 else None)
      if stop.signal or parallel.preempted(step):
        stop.signal = stop.signal or 'SIGTERM'
        break
  if pending is not None:
    _check(pending, nonfinite, t.max_nonfinite, writer)
  if step > start and ckpt.latest_step() != step:
    do_save(step, state)
  ckpt.close()
  writer.close()
  if is_main:
    if stop.signal:
      print(f'{stop.signal}: saved step {step} to {ckpt.directory}; run the same command '
            'to resume')
    elif step > start:
      ev = last_eval or {}
      shown = ', '.join(f'{k} {ev[k]:.4f}' for k in ('loss', 'bpc', 'accuracy') if k in ev)
      print(f'done: {step} steps in {time.perf_counter() - run_start:.0f}s'
            + (f'; val {shown}' if shown else '') + f'; workdir {workdir}')
  return last_eval or {}


def _check(pending, nonfinite: int, limit: int, writer) -> int:
  """Counts consecutive skipped (non-finite) steps; stops the run past `limit`."""
  step, metrics = pending
  skipped = float(np.asarray(metrics['skipped'].addressable_data(0))[0])
  if not skipped:
    return 0
  nonfinite += 1
  writer.scalars(step, 'train', {'nonfinite_steps': nonfinite})
  print(f'\nstep {step}: non-finite loss or gradients; update skipped ({nonfinite} in a row)')
  if nonfinite >= limit:
    raise UserError(f'{nonfinite} consecutive non-finite steps (train.max_nonfinite={limit}); '
                    'stopped. The last good checkpoint is intact; lower optim.lr or check the data')
  return nonfinite


def sample_prompt(run: Run, params) -> tuple[dict, int]:
  """Greedy and sampled continuations of config.train.prompt; the greedy one's longest run."""
  from zhgpt_jax import sample, tokenizer as tok_lib
  texts, longest = {}, 0
  if run.config.train.sample_tokens <= 0:
    return texts, longest
  cfg_sample = run.config.sample.copy_and_resolve_references()
  cfg_sample.max_new_tokens = min(run.config.train.sample_tokens, run.cfg.seq_len // 2)
  for name, temperature in (('greedy', 0.0), ('sampled', cfg_sample.temperature)):
    cfg_sample.temperature = temperature
    ids = sample.generate_ids(run.cfg, params, run.tokenizer, [run.config.train.prompt],
                              cfg_sample)[0]
    texts[name] = tok_lib.decode(run.tokenizer, ids)
    if name == 'greedy':
      longest = sample.longest_run(ids)
  return texts, longest


def evaluate_workdir(workdir: str, step: int | None = None, overrides=None) -> dict:
  """`main.py eval`: val loss, perplexity and bits per character of a saved checkpoint."""
  config, params, meta = ckpt_lib.load_params(workdir, step)
  run = build(config, workdir, training=False)
  result = evaluate(make_eval_step(run.model, config.train.loss_chunk), parallel.replicate(params),
                    run.task.eval_batches(), run.task.chars_per_token)
  if run.task.extra_eval is not None:
    result.update(run.task.extra_eval(run.cfg, jax.tree.map(jnp.asarray, params)))
  result['step'] = meta['step']
  return result
