"""The training run: state, the train and eval steps, and the loop around them.

`train_and_evaluate(config, workdir)` is the whole job: prepare data if needed, build or
restore the state, step, log, evaluate, checkpoint, and stop cleanly on SIGTERM/SIGINT.
The batches come from a `data.Task`; the steps are compiled, and device arrays placed and
read back, by a `parallel` strategy: this module never indexes a device's copy.

Shape letters: B batch, L sequence length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zhgpt_jax import checkpoint as ckpt_lib
from zhgpt_jax import data as data_lib
from zhgpt_jax import loss as loss_lib
from zhgpt_jax import model as model_lib
from zhgpt_jax import moe as moe_lib
from zhgpt_jax import optim, parallel
from zhgpt_jax.config import UserError, check_paths, disk_errors, validate
from zhgpt_jax.metrics import MetricsWriter

# ----------------------------------------------------------------------------- the steps

def make_train_step(config, cfg: model_lib.GPTConfig, strategy: parallel.Strategy | None = None
                    ) -> tuple[optax.GradientTransformation, Callable]:
  """The optimizer of config.optim and the update step, compiled by `strategy` (default pmap).

  Training and the benches call this one function. The step takes (state, batch) with batch
  [grad_accum, B, L] per replica: grads accumulated over the micro-batches, averaged over
  all replicas (`strategy.mean`), clipped and applied. A step whose loss or gradient norm is
  not finite leaves params and optimizer state as they were (metrics['skipped'] = 1); the
  step counter still advances with the data.
  """
  strategy = strategy or parallel.Pmap()
  model = model_lib.GPT(cfg)
  optimizer = optim.make_optimizer(config.optim, config.train.steps)
  lr_schedule = optim.schedule(config.optim, config.train.steps)
  loss_chunk = config.train.loss_chunk

  def step(state, batch):
    rng = jax.random.fold_in(jax.random.fold_in(state['rng'], state['step']),
                             strategy.device_index())
    accum = batch['inputs'].shape[0]
    grad_fn = jax.grad(loss_lib.loss_fn, has_aux=True)

    def micro(grads, xs):
      i, mb = xs
      g, m = grad_fn(state['params'], model, mb, jax.random.fold_in(rng, i), True,
                     loss_chunk)
      return jax.tree.map(jnp.add, grads, g), m

    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    grads, metrics = jax.lax.scan(micro, zeros, (jnp.arange(accum), batch))
    grads = strategy.constrain(strategy.mean(jax.tree.map(lambda g: g / accum, grads)))
    metrics = strategy.mean(jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics))
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if cfg.moe.balance == 'bias' and 'moe_load' in metrics:
      params = moe_lib.balance_params(params, cfg.moe_layers(), metrics['moe_load'],
                                      cfg.moe.bias_rate)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    metrics.update(grad_norm=grad_norm, lr=lr_schedule(state['step']), skipped=1.0 - ok)
    new_state = dict(step=state['step'] + 1, rng=state['rng'],
                     params=keep(params, state['params']),
                     opt_state=keep(opt_state, state['opt_state']))
    return strategy.constrain(new_state), metrics

  return optimizer, strategy.compile(step, donate=True)


def make_eval_step(cfg: model_lib.GPTConfig, loss_chunk: int = 0,
                   strategy: parallel.Strategy | None = None) -> Callable:
  """The eval step: (params, batch) -> summed weighted cross-entropy, summed weight and the
  MoE layers' expert loads [MoE layers, E] (each row a share of the batch's assignments,
  summed over replicas; [0] without MoE), all replicas."""
  strategy = strategy or parallel.Pmap()
  model = model_lib.GPT(cfg)

  def step(params, batch):
    ce_BxL, aux = loss_lib.token_cross_entropy(model, params, batch, None, False, loss_chunk)
    w_BxL = batch['weights']
    load = aux.get('moe_load', jnp.zeros((0,)))
    return (strategy.sum(jnp.sum(ce_BxL * w_BxL)), strategy.sum(jnp.sum(w_BxL)),
            strategy.sum(load))

  return strategy.compile(step)


def evaluate(eval_step, params, batches: Iterator[dict], chars_per_token: float | None,
             strategy: parallel.Strategy | None = None, moe_layers: Sequence[int] = ()) -> dict:
  """Val loss (nats/token), perplexity and, given chars/token, bits per character; for an
  MoE model (`moe_layers`: its MoE layer numbers) each layer's max/min expert load over the
  whole split (`moe_max_min_l{layer}`; 1e9 when an expert got nothing).

  `params` are device arrays in `strategy`'s layout; `batches` host batches of a data.Task.
  """
  strategy = strategy or parallel.Pmap()
  total, count, load = 0.0, 0.0, 0.0
  for batch in batches:
    s, n, batch_load = eval_step(params, strategy.put_batch(batch))
    total += float(strategy.to_host(s))
    count += float(strategy.to_host(n))
    load = load + np.asarray(strategy.to_host(batch_load), np.float64)
  loss = total / max(count, 1.0)
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 50.0)), 'tokens': count}
  if chars_per_token:
    out['bpc'] = loss / math.log(2) / chars_per_token
  for layer, load_E in zip(moe_layers, np.atleast_2d(load)):
    out[f'moe_max_min_l{layer}'] = min(moe_lib.load_ratio(load_E), 1e9)
  return out


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step."""
  config: Any
  workdir: str
  tokenizer_dir: str
  tokenizer: Any
  cfg: model_lib.GPTConfig
  strategy: parallel.Strategy
  optimizer: optax.GradientTransformation
  train_step: Callable          # (state, batch) -> (state, metrics), device arrays
  eval_step: Callable           # (params, batch) -> (summed cross-entropy, summed weight)
  task: data_lib.Task | None = None
  train_iter: Any = None        # the train loader's iterator (its position is checkpointed)


TaskBuilder = Callable[[Any, str, Any], data_lib.Task]   # (config, workdir, tokenizer) -> Task


def build(config, workdir: str, make_task: TaskBuilder | None = None,
          with_data: bool = True, training: bool = True) -> Run:
  """Validates the config and paths, prepares data (process 0), and builds model, optimizer
  and task.

  `make_task` builds the task of config.task; pretraining's (`data.pretraining_task`, on
  shards that process 0 prepares first) is the default, any other task must bring its own.
  Run.config is `config` resolved against init_from (pretrained.resolve): the model shape
  and tokenizer of the model the run starts from. `training=False` (eval) skips the checks
  only training needs (init_from, a val split).
  """
  from zhgpt_jax import pretrained, dataprep, tokenizer as tok_lib
  check_paths(config, workdir, training)
  config = pretrained.resolve(config)
  validate(config)
  if make_task is None and with_data and config.task != 'pretrain':
    raise UserError(f'config.task={config.task!r}: pass its task builder as make_task '
                    '(main.py does)')
  parallel.initialize(config.dist)
  parallel.use_compile_cache(config.train.compile_cache, dataprep.data_dir(config, workdir))
  tokenizer_dir = pretrained.init_tokenizer_dir(config)
  if config.task == 'sft' and tokenizer_dir and \
      not tok_lib.has_chatml(tok_lib.load_tokenizer(tokenizer_dir)):
    if jax.process_index() == 0:
      pretrained.chatml_copy(tokenizer_dir, workdir)
    parallel.sync('chatml')
    tokenizer_dir = os.path.join(workdir, 'tokenizer')
  if with_data and make_task is None:
    if jax.process_index() == 0:
      dataprep.prepare(config, workdir)
    parallel.sync('prepare')
    tokenizer_dir = tokenizer_dir or os.path.join(dataprep.data_dir(config, workdir), 'tokenizer')
  if not tokenizer_dir:
    tokenizer_dir = os.path.join(workdir, 'tokenizer')
  tokenizer = tok_lib.load_tokenizer(tokenizer_dir)
  cfg = model_lib.model_config(config.model, tokenizer.get_vocab_size())
  if cfg.attention != config.model.attention:
    print(f'model.attention={config.model.attention} needs a GPU; using {cfg.attention} on '
          f'this {jax.default_backend()}')
  strategy = parallel.make(config.get('parallel'))
  optimizer, train_step = make_train_step(config, cfg, strategy)
  eval_step = make_eval_step(cfg, config.train.loss_chunk, strategy)
  run = Run(config, workdir, tokenizer_dir, tokenizer, cfg, strategy, optimizer, train_step,
            eval_step)
  if with_data:
    run.task = (make_task or data_lib.pretraining_task)(config, workdir, tokenizer)
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

def short_context(batch: dict, seq_len: int) -> dict:
  """Cuts every row of [..., B, L] into L/seq_len rows of seq_len (same tokens per step)."""
  def cut(x):
    *lead, b, t = x.shape
    return x.reshape(*lead, b * (t // seq_len), seq_len)
  return {k: cut(v) for k, v in batch.items()}


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


def train_and_evaluate(config, workdir: str, make_task: TaskBuilder | None = None) -> dict:
  """Trains to config.train.steps (resuming from the workdir's checkpoint); returns the last eval.

  `make_task`: see `build` (None: pretraining). Every exit, by return or by exception,
  finishes the checkpoint save in flight (or drops a failed one cleanly) before it leaves.
  """
  run = build(config, workdir, make_task)
  config = run.config
  from zhgpt_jax import tokenizer as tok_lib
  tok_hash = tok_lib.tokenizer_hash(run.tokenizer_dir)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep)
  writer = None
  stopped = lambda: (f'training stopped. The last good checkpoint is {ckpt.last_good()}; free '
                     'the space or fix the permission and run the same command to resume')
  try:
    with disk_errors('training', stopped, workdir):   # metrics, TensorBoard, the run files
      state = _start_state(config, workdir, run, ckpt, tok_hash)
      writer = MetricsWriter(workdir, enabled=jax.process_index() == 0,
                             start_step=int(run.strategy.to_host(state['step'])))
      return _loop(config, workdir, run, state, ckpt, writer, tok_hash)
  except BaseException:
    ckpt.abandon()   # waits for (or cleanly drops) a save in flight; never raises
    if writer is not None:
      with contextlib.suppress(OSError):   # a full disk: the error already says so
        writer.close(plot=False)
    raise


def _start_state(config, workdir: str, run: Run, ckpt, tok_hash: str) -> dict:
  """The train state in run.strategy's layout, restored from the newest intact checkpoint
  (saved in any layout) or fresh; also starts run.train_iter (at the restored position) and
  writes the run files."""
  t, dp = config.train, run.strategy
  is_main = jax.process_index() == 0
  run.train_iter = iter(run.task.train_loader)
  fresh = lambda rng: new_state(run.optimizer, model_lib.init_params(run.cfg, rng), config.seed)
  if ckpt.latest_step() is not None:
    saved = model_lib.model_config(ckpt_lib.load_config(workdir).model,
                                   run.tokenizer.get_vocab_size())
    target = dp.restore_target(jax.eval_shape(fresh, jax.random.PRNGKey(0)))

    def resume(step):
      ckpt_lib.check_compatible(saved, run.cfg, ckpt.meta(step)['tokenizer_hash'], tok_hash)
      return ckpt.restore(step, target, run.train_iter)[0]

    latest, state = ckpt.load(resume, on_fallback=ckpt.move_aside)
    state = dp.put_state(state)
    if latest >= t.steps:
      print(f'{workdir}: already trained to step {latest} (train.steps={t.steps}); '
            'raise --config.train.steps to continue')
    elif is_main:
      print(f'resuming from step {latest} in {ckpt.directory}')
  elif config.init_from:
    state = dp.init_state(lambda p: new_state(run.optimizer, p, config.seed),
                          initial_params(run, jax.random.PRNGKey(config.seed)))
  else:   # built in place: under fsdp never whole on one device
    state = dp.init_state(fresh, jax.random.PRNGKey(config.seed))
  if is_main:
    ckpt_lib.save_run_files(workdir, config, run.tokenizer_dir)
  return state


def _loop(config, workdir: str, run: Run, state, ckpt, writer, tok_hash: str) -> dict:
  """The steps, evals and saves of `train_and_evaluate`, from the state's step."""
  t, dp = config.train, run.strategy
  is_main = jax.process_index() == 0
  global_batch = t.per_device_batch * jax.device_count() * t.grad_accum
  tokens_per_step = global_batch * config.model.seq_len
  train_iter = run.train_iter
  abstract = jax.eval_shape(lambda: model_lib.init_params(run.cfg, jax.random.PRNGKey(0)))
  n_params = model_lib.count_params(abstract)
  flops_tok = model_lib.flops_per_token(run.cfg, abstract)
  peak = t.peak_flops or measure_peak_flops()
  if is_main:
    routed = (f', routed {model_lib.routed_flops_per_token(run.cfg) / 1e6:.1f} MFLOPs/token'
              if run.cfg.moe_layers() else '')
    print(f'model: {n_params:,} params ({model_lib.active_params(run.cfg, abstract):,} '
          f'active), {flops_tok / 1e6:.1f} MFLOPs/token (active{routed}), vocab '
          f'{run.cfg.real_vocab_size} (padded {run.cfg.vocab_size})')
    print(f'batch: {t.per_device_batch} per device x {jax.device_count()} devices x '
          f'{t.grad_accum} accumulation = {global_batch} sequences of {config.model.seq_len} '
          f'= {tokens_per_step:,} tokens/step; peak {peak / 1e12:.3f} TFLOP/s per device')
    print(parallel.describe(dp, state))
    if config.optim.warmup_steps >= t.steps:
      print(f'note: optim.warmup_steps={config.optim.warmup_steps} >= train.steps={t.steps}: '
            f'the whole run is warmup (the rate ends at {t.steps / config.optim.warmup_steps:.0%} '
            'of its peak)')

  start = int(dp.to_host(state['step']))

  def do_eval(step, state):
    params = dp.to_host(state['params'])
    result = evaluate(run.eval_step, state['params'], run.task.eval_batches(),
                      run.task.chars_per_token, dp, run.cfg.moe_layers())
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
    if not parallel.all_finite(state['params']):
      raise UserError(f'step {step}: parameters are not finite; not saving over the last good '
                      'checkpoint')
    meta = dict(step=step, tokenizer_hash=tok_hash, val=result)
    ckpt.save(step, dp.savable(state), train_iter, meta,
              val_loss=None if result is None else result['loss'])

  from tqdm import tqdm
  bar = tqdm(total=t.steps, initial=start, disable=not is_main, desc='train', dynamic_ncols=True)
  last_eval, pending, nonfinite = None, None, 0
  t0, window_steps, run_start = time.perf_counter(), 0, time.perf_counter()
  window_load = 0.0   # MoE: the expert loads [MoE layers, E] summed over the log window
  step = start
  with _StopFlag() as stop, contextlib.closing(bar):   # an error line starts on a line of its own
    while step < t.steps:
      batch = next(train_iter)
      if step < t.short_seq_steps:
        batch = short_context(batch, t.short_seq_len)
      state, metrics = run.train_step(state, dp.put_batch(batch))
      step += 1
      if jax.process_count() == 1:
        ckpt.poll()   # a failed background save stops the run here, not at the next save
      window_steps += 1
      # Read the previous step's metrics only now, so the device never waits on the host.
      if pending is not None:
        nonfinite = _check(*pending, dp, nonfinite, t.max_nonfinite, writer)
        window_load += _moe_load(pending[1], dp)
      pending = (step, metrics)
      if step % t.log_every == 0 or step == t.steps:
        nonfinite = _check(*pending, dp, nonfinite, t.max_nonfinite, writer)
        window_load += _moe_load(pending[1], dp)
        pending = None
        host = dp.to_host(metrics)
        dt = time.perf_counter() - t0
        tps = window_steps * tokens_per_step / dt
        logged = dict(loss=host['loss'], lr=host['lr'], grad_norm=host['grad_norm'],
                      tokens_per_s=tps, mfu=tps * flops_tok / (peak * jax.device_count()))
        if 'moe_balance' in host:
          logged.update(moe_balance=host['moe_balance'], moe_z=host['moe_z'],
                        moe_dropped=host['moe_dropped'])
          # Loads over every step since the last log: one batch's load is noisy (its few
          # documents favour their own experts), the window's is what balancing evens out.
          for layer, load in zip(run.cfg.moe_layers(), window_load / window_steps):
            logged[f'moe_max_min_l{layer}'] = min(moe_lib.load_ratio(load), 1e9)
            logged.update({f'moe_load_l{layer}_e{e}': v for e, v in enumerate(load)})
        writer.scalars(step, 'train', logged)
        bar.set_postfix(loss=f'{host["loss"]:.3f}', lr=f'{host["lr"]:.2e}', tok_s=f'{tps:,.0f}')
        t0, window_steps, window_load = time.perf_counter(), 0, 0.0
      bar.update(1)
      if step % t.eval_every == 0 or step == t.steps:
        last_eval = do_eval(step, state)
      if step % t.ckpt_every == 0 or step == t.steps:
        do_save(step, state, last_eval if last_eval and step % t.eval_every == 0 else None)
      if stop.signal or parallel.preempted(step):
        stop.signal = stop.signal or 'SIGTERM'
        break
  if pending is not None:
    _check(*pending, dp, nonfinite, t.max_nonfinite, writer)
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


def _moe_load(metrics, dp):
  """A step's MoE expert loads [MoE layers, E] on the host (0.0 without MoE)."""
  return dp.to_host(metrics['moe_load']) if 'moe_load' in metrics else 0.0


def _check(step: int, metrics, dp, nonfinite: int, limit: int, writer) -> int:
  """Counts consecutive skipped (non-finite) steps; stops the run past `limit`."""
  if not float(dp.to_host(metrics['skipped'])):
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


def evaluate_workdir(workdir: str, step: int | None = None,
                     make_task: TaskBuilder | None = None) -> dict:
  """`main.py eval`: val loss, perplexity and bits per character of a saved checkpoint."""
  config, params, meta = ckpt_lib.load_params(workdir, step)
  run = build(config, workdir, make_task, training=False)
  result = evaluate(run.eval_step, run.strategy.put_state(params), run.task.eval_batches(),
                    run.task.chars_per_token, run.strategy, run.cfg.moe_layers())
  if run.task.extra_eval is not None:
    result.update(run.task.extra_eval(run.cfg, jax.tree.map(jnp.asarray, params)))
  result['step'] = meta['step']
  return result
