"""Orbax checkpoints of a run: train state, data-iterator state, and what the run was.

A workdir is self-contained: `config.json` (the resolved config), `tokenizer/` (its files),
and `checkpoints/<step>/` with items `state` (params, optimizer state, step, RNG — plain
arrays, no pickle), `data` (grain iterator state per process) and `meta` (JSON). Orbax
writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves nothing that a later run would load.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from zhgpt_jax.config import UserError, default_config

# Fields whose change makes old parameters meaningless (shapes, vocab, architecture).
SHAPE_FIELDS = ('model.n_layer', 'model.n_head', 'model.n_kv_head', 'model.d_model',
                'model.seq_len', 'model.vocab_multiple', 'model.vocab_size', 'model.position',
                'model.mlp', 'model.mlp_ratio', 'model.mlp_hidden', 'model.norm', 'model.bias',
                'model.qkv_bias', 'model.tie_embeddings', 'model.moe.n_routed',
                'model.moe.n_shared', 'model.moe.expert_hidden', 'model.moe.every',
                'model.moe.top_k', 'model.moe.shared_gate', 'model.moe.first_dense',
                'model.moe.balance', 'tokenizer.vocab_size')


def write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


def save_run_files(workdir: str, config, tokenizer_dir: str) -> None:
  """Writes config.json and a copy of the tokenizer's files into the workdir (process 0 only)."""
  from zhgpt_jax import tokenizer as tok_lib
  os.makedirs(workdir, exist_ok=True)
  write_atomic(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  dst = os.path.join(workdir, 'tokenizer')
  if os.path.abspath(tokenizer_dir) != os.path.abspath(dst):
    tok_lib.copy_tokenizer(tokenizer_dir, dst)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{workdir}: no config.json; is this a zhgpt-jax workdir?')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def _get(config, dotted):
  for part in dotted.split('.'):
    config = config.get(part) if hasattr(config, 'get') else None
  return config


def check_compatible(saved, config, saved_tok_hash: str, tok_hash: str) -> None:
  """Raises UserError naming every field that differs in a way a resume cannot absorb."""
  # A field a run saved before it existed (None) had the behaviour of its default.
  defaults = default_config()
  diffs = [f'{k}: {_get(saved, k)!r} -> {_get(config, k)!r}' for k in SHAPE_FIELDS
           if _get(saved, k) != _get(config, k) and (_get(saved, k) is not None
                                                     or _get(config, k) != _get(defaults, k))]
  if saved_tok_hash != tok_hash:
    diffs.append('tokenizer: a different tokenizer.json')
  if diffs:
    raise UserError('cannot resume: the checkpoint was trained with a different model or '
                    'tokenizer (' + '; '.join(diffs) + '); use a new --workdir')


class Checkpointer:
  """Saves every `ckpt_every` steps; keeps the last `keep` and the best by val loss."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=lambda m: m['val_loss'], reverse=True, n=1,
                           keep_checkpoints_without_metrics=False)]))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter, meta: dict, val_loss: float | None = None):
    """Starts an (asynchronous) save; `state` must hold host-addressable arrays."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      import grain
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    metrics = None if val_loss is None else {'val_loss': float(val_loss)}
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Returns (state, meta); advances `data_iter` to its saved position when given."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iter is not None:
      import grain
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out['state'], out['meta']

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_params(self, step: int | None = None):
    """Only the parameters of `step` (default: latest), as numpy arrays."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise UserError(f'{self.directory}: no checkpoint to load')
    if step not in self.manager.all_steps():
      raise UserError(f'{self.directory}: no checkpoint at step {step} '
                      f'(have {sorted(self.manager.all_steps())})')
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return out['state']['params'], out['meta']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_params(workdir: str, step: int | None = None):
  """(config, params, meta) of a workdir's latest (or `step`) checkpoint, on the host."""
  config = load_config(workdir)
  ckpt = Checkpointer(workdir, keep=config.train.keep, async_save=False)
  try:
    params, meta = ckpt.restore_params(step)
  finally:
    ckpt.close()
  return config, jax.tree.map(lambda x: x, params), meta


def load_model(workdir: str, step: int | None = None):
  """What sampling, chat and export need from a workdir: (GPTConfig, params, tokenizer, config)."""
  from zhgpt_jax import model as model_lib
  from zhgpt_jax import tokenizer as tok_lib
  config, params, _ = load_params(workdir, step)
  tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  cfg = model_lib.model_config(config.model, tokenizer.get_vocab_size())
  if cfg.attention == 'cudnn' and jax.default_backend() != 'gpu':
    cfg = dataclasses.replace(cfg, attention='xla')
  return cfg, params, tokenizer, config
