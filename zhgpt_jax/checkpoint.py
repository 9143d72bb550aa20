"""Orbax checkpoints of a run: train state, data-iterator state, and what the run was.

A workdir is self-contained: `config.json` (the resolved config), `tokenizer/` (its files),
and `checkpoints/<step>/` with items `state` (params, optimizer state, step, RNG — plain
arrays, no pickle), `data` (grain iterator state per process) and `meta` (JSON). Orbax
writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves nothing that a later run would load.

Once a save has finished, `manifest.zhgpt.json` in the step directory records the size and
sha256 of every file (`seal`). Loading validates a step before trusting it (`damage`: a file
missing, truncated or changed; then orbax's own restore) and falls back to the newest
intact step, printing one line that names both; `keep` deletes old steps only after a newer
save has finished, so the last intact step is never deleted. A failed save (disk full, no
permission) raises `SaveError` naming the step, the cause and the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from zhgpt_jax import files
from zhgpt_jax.config import UserError, load_config_json

MANIFEST = 'manifest.zhgpt.json'
DAMAGED = 'checkpoints-damaged'   # where a resume moves damaged steps (never deletes them)
# Words of an OSError inside orbax/tensorstore messages, for a one-line cause.
_CAUSES = ('No space left on device', 'Disk quota exceeded', 'Permission denied',
           'Read-only file system', 'File too large', 'Input/output error')


def save_run_files(workdir: str, config, tokenizer_dir: str) -> None:
  """Writes config.json and a copy of the tokenizer's files into the workdir (process 0 only)."""
  from zhgpt_jax import tokenizer as tok_lib
  os.makedirs(workdir, exist_ok=True)
  files.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  dst = os.path.join(workdir, 'tokenizer')
  if os.path.abspath(tokenizer_dir) != os.path.abspath(dst):
    tok_lib.copy_tokenizer(tokenizer_dir, dst)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir`; UserError if it is missing or unreadable."""
  if not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir}: ' + ('is a file, not a run directory'
                    if os.path.exists(workdir) else 'no such directory'))
  return load_config_json(os.path.join(workdir, 'config.json'))


def check_compatible(saved_cfg, cfg, saved_tok_hash: str, tok_hash: str) -> None:
  """Raises UserError naming every difference a resume cannot absorb: a parameter field of
  the two models' GPTConfigs (`model.param_diffs`), or the tokenizer. A key a run saved
  before it existed takes its default in `model.model_config`, so such a run resumes."""
  from zhgpt_jax import model as model_lib
  diffs = model_lib.param_diffs(saved_cfg, cfg)
  if saved_tok_hash != tok_hash:
    diffs.append('tokenizer: a different tokenizer.json')
  if diffs:
    raise UserError('cannot resume: the checkpoint was trained with a different model or '
                    'tokenizer (' + '; '.join(diffs) + '); use a new --workdir')


class SaveError(UserError):
  """A checkpoint save that failed (disk full, permission): training stops at once."""


def one_line(e: BaseException) -> str:
  """A short one-line cause of an orbax/tensorstore/OS error."""
  text = str(e)
  for cause in _CAUSES:
    if cause in text:
      return cause
  text = ' '.join(text.split())
  return f'{type(e).__name__}: {text[:200]}' if text else type(e).__name__


def _files(step_dir: str) -> list[str]:
  return sorted(os.path.relpath(os.path.join(d, f), step_dir)
                for d, _, fs in os.walk(step_dir) for f in fs if f != MANIFEST)


def seal(step_dir: str) -> None:
  """Writes the manifest (size and sha256 of every file) of a finished step."""
  manifest = {rel: [os.path.getsize(os.path.join(step_dir, rel)),
                    files.sha256(os.path.join(step_dir, rel))] for rel in _files(step_dir)}
  files.write_text(os.path.join(step_dir, MANIFEST), json.dumps(manifest, indent=0))


def damage(step_dir: str, hashes: bool = True) -> str | None:
  """Why the step in `step_dir` cannot be trusted, or None when its files are as sealed.

  A step without a manifest (saved by an older version, or killed between orbax's rename and
  the seal) is judged by orbax's restore alone. `hashes=False` checks names and sizes only.
  """
  if not os.path.isdir(step_dir):
    return 'its directory is missing'
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None if _files(step_dir) else 'its directory is empty'
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
    items = [(rel, int(size), str(digest)) for rel, (size, digest) in manifest.items()]
  except (OSError, ValueError, TypeError, AttributeError):
    return f'{MANIFEST} is unreadable'
  for rel, size, digest in items:
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      return f'{rel} is missing'
    have = os.path.getsize(full)
    if have != size:
      return f'{rel} has {have:,} bytes, {size:,} expected'
    if hashes and files.sha256(full) != digest:
      return f'{rel} does not match its checksum'
  return None


class Checkpointer:
  """Saves every `ckpt_every` steps; keeps the last `keep` and the best by val loss."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise UserError(f'{self.directory} is a file, not a checkpoint directory')
    self.keep = keep
    self.async_save = async_save
    self._pending = None      # the step whose save may still be running
    # No orbax preservation policy: orbax picks the steps to delete when a save starts and
    # deletes them even when that save fails. `_collect` deletes only after a save finished.
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'data', 'meta'))

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def all_steps(self) -> list[int]:
    """Every finished (renamed) step directory, oldest first."""
    names = os.listdir(self.directory) if os.path.isdir(self.directory) else []
    return sorted(set(self.manager.all_steps()) | {int(n) for n in names if n.isdigit()})

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def last_good(self) -> str:
    """Words for the newest step whose files are as sealed (sizes checked)."""
    for step in reversed(self.all_steps()):
      if step != self._pending and damage(self.step_dir(step), hashes=False) is None:
        return f'step {step} in {self.directory}'
    return f'none in {self.directory}'

  def save(self, step: int, state, data_iter, meta: dict, val_loss: float | None = None):
    """Starts an (asynchronous) save; `state` must hold host-addressable arrays.

    Finishes the previous save first; raises SaveError when that one, or this one when
    saving synchronously, failed.
    """
    self.finish()
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_iter is not None:
      import grain
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)
    if not self.async_save:
      self.finish()

  def poll(self) -> None:
    """Finishes a save that has completed in the background (raises SaveError if it failed)."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.finish()

  def finish(self) -> None:
    """Waits for the save in flight; seals it and deletes old steps, or raises SaveError."""
    step = self._pending
    if step is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)
    self._pending = None
    if not os.path.isdir(self.step_dir(step)):
      self._failed(step, None)
    if jax.process_index() == 0:
      seal(self.step_dir(step))
    self._collect(step)

  def _failed(self, step: int, error: BaseException | None):
    self._pending = None
    try:   # let orbax's other writers of this step stop before its partial files are removed
      self.manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except
      pass
    for name in os.listdir(self.directory) if os.path.isdir(self.directory) else ():
      if name.startswith(f'{step}.orbax-checkpoint-tmp') and jax.process_index() == 0:
        # Our partial save (best effort: a writer still running may leave some of it, which
        # the next start's orbax removes; it is never listed as a step).
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    why = one_line(error) if error is not None else 'orbax did not finish it'
    raise SaveError(f'step {step}: saving the checkpoint failed ({why}); training stopped. '
                    f'The last good checkpoint is {self.last_good()}; free the space or fix '
                    'the permission and run the same command to resume') from None

  def _val_loss(self, step: int) -> float | None:
    try:
      with open(os.path.join(self.step_dir(step), 'meta', 'metadata'), encoding='utf-8') as f:
        return float(json.load(f)['val']['loss'])
    except (OSError, ValueError, TypeError, KeyError):
      return None

  def _collect(self, newest: int) -> None:
    """Deletes the steps older than `newest` (just finished) beyond the last `keep` and the
    best by val loss."""
    steps = [s for s in self.all_steps() if s <= newest]
    kept = set(steps[-self.keep:])
    losses = {s: self._val_loss(s) for s in steps}
    scored = [s for s in steps if losses[s] is not None]
    if scored:
      kept.add(min(scored, key=lambda s: (losses[s], -s)))
    listed = set(self.manager.all_steps())
    for step in steps:
      if step not in kept and step in listed:
        self.manager.delete(step)

  def load(self, fn, step: int | None = None, on_fallback=None):
    """Returns (step, fn(step)) for the newest intact step, or for `step` when given.

    A step is intact when its files match its manifest and `fn` (an orbax restore) succeeds
    on it. Falling back past damaged steps prints one line naming them and the step used;
    `on_fallback(damaged_steps)` runs before that line. Raises UserError when `step` is
    damaged or absent, or when no step is intact.
    """
    steps = self.all_steps()
    if not steps:
      raise UserError(f'{self.directory}: no checkpoint to load')
    if step is not None and step not in steps:
      raise UserError(f'{self.directory}: no checkpoint at step {step} (have {steps})')
    damaged = []
    for s in [step] if step is not None else reversed(steps):
      why = damage(self.step_dir(s))
      if why is None:
        try:
          result = fn(s)
        except UserError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          why = f'orbax cannot restore it: {one_line(e)}'
        else:
          if damaged:
            moved = on_fallback([d for d, _ in damaged]) if on_fallback else ''
            print(f'warning: checkpoint {_steps_why(damaged)} in {self.directory}; '
                  f'using step {s}{moved}', file=sys.stderr, flush=True)
          return s, result
      damaged.append((s, why))
    if step is not None:
      raise UserError(f'{self.directory}: checkpoint {_steps_why(damaged)}; pick another '
                      f'--step (have {steps})')
    raise UserError(f'{self.directory}: no intact checkpoint ({_steps_why(damaged)}); '
                    'restore it from a backup or train in a new --workdir')

  def move_aside(self, steps: list[int]) -> str:
    """Moves damaged `steps` to <workdir>/checkpoints-damaged/ (process 0); returns words."""
    if jax.process_index() == 0:
      root = os.path.join(self.workdir, DAMAGED)
      os.makedirs(root, exist_ok=True)
      for step in steps:
        dst, n = os.path.join(root, str(step)), 1
        while os.path.exists(dst):
          dst, n = os.path.join(root, f'{step}.{n}'), n + 1
        os.rename(self.step_dir(step), dst)
    self.manager.reload()
    where = os.path.join(self.workdir, DAMAGED)
    return f'; moved the damaged step{"s" * (len(steps) > 1)} to {where}'

  def restore(self, step: int, abstract_state, data_iter=None):
    """Returns (state, meta) of `step`; advances `data_iter` to its saved position when given."""
    items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    if data_iter is not None:
      import grain
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out['state'], out['meta']

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore_params(self, step: int | None = None):
    """The parameters and meta of `step` (default: the newest intact step), as numpy arrays.

    Only the params are read, as host arrays, whatever layout (pmap, any fsdp mesh) saved them.
    """
    def params(s):
      saved = ocp.PyTreeCheckpointHandler().metadata(
          pathlib.Path(self.step_dir(s), 'state')).tree['params']
      item = {'params': jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)}
      as_numpy = {'params': jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray),
                                         saved)}
      out = self.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=item, restore_args=as_numpy, partial_restore=True),
          meta=ocp.args.JsonRestore()))
      return out['state']['params'], out['meta']
    return self.load(params, step)[1]

  def close(self):
    """Finishes the save in flight (raising SaveError if it failed) and closes the manager."""
    try:
      self.finish()
    finally:
      self.manager.close()

  def abandon(self):
    """On an error exit: finishes the save in flight if it can, never raising; closes."""
    try:
      self.finish()
    except SaveError as e:
      print(f'warning: {e}', file=sys.stderr, flush=True)
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass


def _steps_why(damaged: list[tuple[int, str]]) -> str:
  """'step 20 is damaged (why)' or 'steps 30, 20 are damaged (30: why; 20: why)'."""
  if len(damaged) == 1:
    return f'step {damaged[0][0]} is damaged ({damaged[0][1]})'
  return (f'steps {", ".join(str(s) for s, _ in damaged)} are damaged ('
          + '; '.join(f'{s}: {w}' for s, w in damaged) + ')')


def load_params(workdir: str, step: int | None = None):
  """(config, params, meta) of a workdir's latest (or `step`) checkpoint, on the host."""
  config = load_config(workdir)
  ckpt = Checkpointer(workdir, keep=config.train.keep, async_save=False)
  try:
    params, meta = ckpt.restore_params(step)
  finally:
    ckpt.close()
  return config, params, meta


class Loaded(NamedTuple):
  """What sampling, chat and export need from a workdir."""
  cfg: Any          # model.GPTConfig, with the attention this backend can run
  params: Any       # host (numpy) arrays
  tokenizer: Any    # tokenizers.Tokenizer
  config: ml_collections.ConfigDict   # the run's config
  meta: dict        # the checkpoint's meta (step, tokenizer_hash, val)


def load_model(workdir: str, step: int | None = None) -> Loaded:
  """The model of a workdir's latest (or `step`) checkpoint, its tokenizer and its config."""
  from zhgpt_jax import model as model_lib
  from zhgpt_jax import tokenizer as tok_lib
  config, params, meta = load_params(workdir, step)
  tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  cfg = model_lib.model_config(config.model, tokenizer.get_vocab_size())
  return Loaded(cfg, params, tokenizer, config, meta)
