"""The input pipelines' common shape (`Task`) and pretraining's: grain over prepare's shards.

A `Task` is what the train loop consumes: an endless iterator of train batches, a way to
make a fresh pass over the val split, and optional extra metrics. Batches are dicts of host
numpy arrays: 'inputs' and 'targets' (int32), optionally 'weights' (loss mask, float32),
'segment_ids' and 'positions' (packed rows); train batches are [local devices, grad_accum,
per_device_batch, seq_len], eval batches [local devices, eval_batch, seq_len].
`pretraining_task` is the default; `sft.make_task` builds the fine-tuning one.

The token stream of a split (documents joined by <|endoftext|>) is cut into windows of
seq_len + 1 tokens with stride seq_len, so every token is a target exactly once. Training
shuffles windows deterministically from the seed, gives each process its own slice, and
batches them to [local_devices, grad_accum, per_device_batch, seq_len] inputs and targets
(the window shifted by one). The iterator's state is checkpointed with the run, so a
resumed run continues in the same order.

With source weights (config.data.corpus='news/:2,web/:1'), each source's shards are windows of
their own, shuffled apart, and grain's `MapDataset.mix` interleaves them deterministically
in those proportions: a source's share of the training windows is its weight, however many
tokens it has, and a small source is simply read more epochs (`epoch_report` says how many).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import glob
import json
import os
from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np

from zhgpt_jax import dataprep, documents
from zhgpt_jax.config import UserError


def read_meta(split_dir: str) -> dict:
  """The split's meta.json; UserError when it is missing."""
  meta_path = os.path.join(split_dir, 'meta.json')
  if not os.path.exists(meta_path):
    raise UserError(f'{split_dir}: no meta.json; run `python main.py prepare` first')
  with open(meta_path, encoding='utf-8') as f:
    return json.load(f)


@dataclasses.dataclass
class Task:
  """What the loop trains on: an iterator of train batches and ways to evaluate."""
  train_loader: Any                       # grain dataset of [devices, accum, B, L] dicts
  eval_batches: Callable[[], Iterator]    # a fresh pass over the val split
  chars_per_token: float | None = None    # of the val split, for bits per character
  extra_eval: Callable | None = None      # (cfg, params) -> dict of extra val metrics


def pretraining_task(config, workdir: str, tokenizer=None) -> Task:
  """The task of config.data: windows of the prepared token shards (`dataprep.prepare`)."""
  del tokenizer   # the shards are already tokens
  t, m = config.train, config.model
  data_dir = dataprep.data_dir(config, workdir)
  devices, pi, pc = jax.local_device_count(), jax.process_index(), jax.process_count()
  weights = documents.source_weights(config.data.corpus, config.data.split)
  loader = train_loader(
      os.path.join(data_dir, 'train'), m.seq_len, per_device_batch=t.per_device_batch,
      grad_accum=t.grad_accum, local_devices=devices, seed=config.seed, process_index=pi,
      process_count=pc, workers=config.data.loader_workers, prefetch=config.data.prefetch,
      weights=weights)
  if pi == 0:
    tokens = devices * pc * t.grad_accum * t.per_device_batch * m.seq_len
    for line in epoch_report(os.path.join(data_dir, 'train'), weights, tokens, t.steps):
      print(line, flush=True)
  val_dir = os.path.join(data_dir, 'val')
  TokenWindows(val_dir, m.seq_len)   # an empty val split is an error now, not at step 1000
  meta = read_meta(val_dir)
  cpt = meta['characters'] / meta['tokens'] if meta.get('tokens') else None
  return Task(
      train_loader=loader,
      eval_batches=lambda: eval_batches(
          val_dir, m.seq_len, batch=t.eval_batch, local_devices=devices, process_index=pi,
          process_count=pc, max_batches=t.eval_max_batches),
      chars_per_token=cpt)


class TokenWindows(grain.sources.RandomAccessDataSource):
  """Window i = tokens[i·seq_len : i·seq_len + seq_len + 1] of a split's concatenated shards.

  Holds only paths; shards are memory-mapped on first use, so the source pickles cheaply
  to grain's worker processes.
  """

  def __init__(self, split_dir: str, seq_len: int, source: int | None = None):
    meta = read_meta(split_dir)
    if source is None:
      self.paths = sorted(glob.glob(os.path.join(split_dir, 'shard_*.bin')))
    else:  # one source's shards (each shard holds one source)
      self.paths = [os.path.join(split_dir, s['name']) for s in meta['shards']
                    if s.get('source', 0) == source]
    self.dtype = np.dtype(meta['dtype'])
    sizes = [os.path.getsize(p) // self.dtype.itemsize for p in self.paths]
    self.starts = list(np.cumsum([0] + sizes))
    self.n_tokens = int(self.starts[-1])
    self.seq_len = seq_len
    if self.n_tokens < seq_len + 1:
      what = split_dir if source is None else f'{split_dir} source {source}'
      raise UserError(f'{what}: {self.n_tokens} tokens, fewer than one window of '
                      f'{seq_len + 1}; use a bigger corpus or a smaller model.seq_len')
    self._maps = None

  def __len__(self) -> int:
    return (self.n_tokens - 1) // self.seq_len

  def tokens(self, start: int, stop: int) -> np.ndarray:
    if self._maps is None:
      self._maps = [np.memmap(p, dtype=self.dtype, mode='r') for p in self.paths]
    pieces = []
    while start < stop:
      i = bisect.bisect_right(self.starts, start) - 1
      end = min(stop, self.starts[i + 1])
      pieces.append(self._maps[i][start - self.starts[i]:end - self.starts[i]])
      start = end
    return np.concatenate(pieces).astype(np.int32)

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self.seq_len
    return self.tokens(start, start + self.seq_len + 1)

  def __repr__(self) -> str:
    # grain checks a restored iterator against the source by repr; make it stable.
    return f'TokenWindows({len(self.paths)} shards, {self.n_tokens} tokens, seq_len={self.seq_len})'

  def __getstate__(self):
    return {**self.__dict__, '_maps': None}


def train_loader(split_dir: str, seq_len: int, *, per_device_batch: int, grad_accum: int,
                 local_devices: int, seed: int, process_index: int, process_count: int,
                 workers: int = 0, prefetch: int = 2,
                 weights: list[float] | None = None) -> grain.IterDataset:
  """An endless, shuffled grain dataset of {'inputs', 'targets'}: int32 [devices, accum, batch, seq_len].

  All processes walk one global shuffled order (reshuffled every epoch); each global batch
  is cut into consecutive per-process slices, and process p reads only its own slice. So
  the batch every device sees is the same for 1 process × 4 devices and 2 processes × 2
  devices, and processes never read the same window in an epoch. `weights` (one a source,
  summing to 1) mix the sources' windows in those proportions.
  """
  source = TokenWindows(split_dir, seq_len)
  per_process = local_devices * grad_accum * per_device_batch
  if len(source) < per_process * process_count:
    raise UserError(f'{split_dir}: {len(source)} windows of {seq_len + 1} tokens cannot fill '
                    f'one global batch of {per_process * process_count}; lower '
                    'train.per_device_batch')
  if weights:
    parts = [grain.MapDataset.source(TokenWindows(split_dir, seq_len, i)).shuffle(seed=seed + i)
             .repeat(None) for i in range(len(weights))]
    ds = grain.MapDataset.mix(parts, list(weights))
    global_batch = per_process * process_count   # no epoch ends: nothing to drop
    epoch_len = len(source) // global_batch * global_batch
  else:
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    epoch_len = len(source)
  shape = (local_devices, grad_accum, per_device_batch, seq_len + 1)
  return process_batches(ds, epoch_len, per_process, functools.partial(_to_batch, shape=shape),
                         process_index=process_index, process_count=process_count,
                         workers=workers, prefetch=prefetch)


def process_batches(ds: grain.MapDataset, epoch_len: int, per_process: int, to_batch: Callable,
                    *, process_index: int, process_count: int, workers: int = 0,
                    prefetch: int = 2) -> grain.IterDataset:
  """Every task's train pipeline after its endless global order `ds`: this process's batches.

  Each global batch of `ds` is cut into consecutive per-process slices of `per_process`
  elements, and process p reads only its own slice (`_ProcessSlice`; an epoch of
  `epoch_len` elements drops its last partial global batch). `to_batch` (picklable, for
  worker processes) shapes the stacked slice into the batch dict.
  """
  ds = _ProcessSlice(ds, per_process, process_count, process_index, epoch_len)
  ds = ds.batch(per_process, drop_remainder=True).map(to_batch)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=prefetch))
  if workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


class _ProcessSlice(grain.MapDataset):
  """Element j of process p = element (j // k)·K + p·k + j % k of the global order.

  k = per-process batch, K = k · processes. Each epoch drops its last partial global batch
  so that epochs stay aligned across processes.
  """

  def __init__(self, parent, per_process: int, processes: int, index: int, epoch_len: int):
    super().__init__(parent)
    self.k, self.p, self.i = per_process, processes, index
    self.epoch_len = epoch_len
    self.batches_per_epoch = epoch_len // (per_process * processes)

  def __len__(self):
    return self._parent.__len__() // self.p

  def __getitem__(self, j):
    batch, offset = divmod(j, self.k)
    epoch, b = divmod(batch, self.batches_per_epoch)
    return self._parent[epoch * self.epoch_len + (b * self.p + self.i) * self.k + offset]

  def __str__(self):
    return f'ProcessSlice(k={self.k}, processes={self.p}, index={self.i})'


def _to_batch(windows, shape):
  windows = np.asarray(windows).reshape(shape)
  return {'inputs': windows[..., :-1], 'targets': windows[..., 1:]}


def eval_batches(split_dir: str, seq_len: int, *, batch: int, local_devices: int,
                 process_index: int, process_count: int, max_batches: int = 0):
  """Yields {'inputs', 'targets', 'weights'} batches of [devices, batch, seq_len].

  Covers the split exactly once, in order: process p takes windows p, p + P, ...; the last
  (shorter) window and the padding rows that fill the final batch carry weight 0, so the
  weighted mean loss is exact over every target token of the split. Every process yields
  the same number of batches, as the pmapped step needs.
  """
  source = TokenWindows(split_dir, seq_len)
  n_windows = -(-(source.n_tokens - 1) // seq_len)   # the last one may be short
  per_batch = local_devices * batch
  for take in eval_rows(n_windows, per_batch, process_index, process_count, max_batches):
    x = np.zeros((per_batch, seq_len + 1), np.int32)
    w = np.zeros((per_batch, seq_len), np.float32)
    for row, i in enumerate(take):
      start = int(i) * seq_len
      window = source.tokens(start, min(start + seq_len + 1, source.n_tokens))
      x[row, :len(window)] = window
      w[row, :len(window) - 1] = 1.0
    x = x.reshape(local_devices, batch, seq_len + 1)
    yield {'inputs': x[..., :-1], 'targets': x[..., 1:],
           'weights': w.reshape(local_devices, batch, seq_len)}


def epoch_report(split_dir: str, weights: list[float] | None, tokens_per_step: int,
                 steps: int, memorise_epochs: float = 10.0) -> list[str]:
  """Lines to print at the start of training: each source's tokens, share and effective
  epochs over `steps`, and a warning when any source would be read more than
  `memorise_epochs` times."""
  meta = read_meta(split_dir)
  groups = meta.get('source_groups') or [dict(name=meta.get('corpus', 'corpus'),
                                              tokens=meta['tokens'])]
  read = tokens_per_step * steps
  shares = weights or [g['tokens'] / max(1, meta['tokens']) for g in groups]
  lines, worst = [], (0.0, '')
  for g, share in zip(groups, shares):
    epochs = read * share / max(1, g['tokens'])
    worst = max(worst, (epochs, g['name']))
    if len(groups) > 1:
      lines.append(f'data: source {g["name"]}: {g["tokens"]:,} tokens, {share:.1%} of the '
                   f'windows, {epochs:.2f} epochs')
  lines.append(f'data: {steps:,} steps x {tokens_per_step:,} tokens = {read:,} tokens, '
               f'{read / max(1, meta["tokens"]):.2f} epochs of the {meta["tokens"]:,}-token '
               'train split')
  if worst[0] > memorise_epochs:
    what = 'the train split' if len(groups) == 1 else f'source {worst[1]}'
    lines.append(f'warning: this run reads {what} {worst[0]:.0f} times (> {memorise_epochs:.0f} '
                 'epochs): the model will memorise it; use a bigger corpus (config.data.corpus)'
                 ', fewer steps (config.train.steps), a smaller batch, or a smaller model')
  return lines


def eval_rows(n: int, per_batch: int, process_index: int, process_count: int,
              max_batches: int = 0) -> Iterator[np.ndarray]:
  """The val rows of each eval batch of this process, in order: rows p, p + P, ... of `n`.

  Every process gets the same number of batches (the pmapped step needs them all); the
  last ones hold fewer than `per_batch` rows, or none, and are padded by the caller.
  """
  mine = np.arange(process_index, n, process_count)
  n_batches = -(-(-(-n // process_count)) // per_batch)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  for b in range(n_batches):
    yield mine[b * per_batch:(b + 1) * per_batch]
