"""The input pipeline: grain over the token shards that `shards.py` wrote.

The token stream of a split (documents joined by <|endoftext|>) is cut into windows of
seq_len + 1 tokens with stride seq_len, so every token is a target exactly once. Training
shuffles windows deterministically from the seed, gives each process its own slice, and
batches them to [local_devices, grad_accum, per_device_batch, seq_len] inputs and targets
(the window shifted by one). The loader's
iterator state is checkpointed with the run, so a resumed run continues the same order.
"""

from __future__ import annotations

import bisect
import glob
import json
import os

import grain
import numpy as np

from zhgpt_jax.config import UserError


class TokenWindows(grain.sources.RandomAccessDataSource):
  """Window i = tokens[i·seq_len : i·seq_len + seq_len + 1] of a split's concatenated shards.

  Holds only paths; shards are memory-mapped on first use, so the source pickles cheaply
  to grain's worker processes.
  """

  def __init__(self, split_dir: str, seq_len: int):
    meta_path = os.path.join(split_dir, 'meta.json')
    if not os.path.exists(meta_path):
      raise UserError(f'{split_dir}: no meta.json; run `python main.py prepare` first')
    with open(meta_path) as f:
      meta = json.load(f)
    self.paths = sorted(glob.glob(os.path.join(split_dir, 'shard_*.bin')))
    self.dtype = np.dtype(meta['dtype'])
    sizes = [os.path.getsize(p) // self.dtype.itemsize for p in self.paths]
    self.starts = list(np.cumsum([0] + sizes))
    self.n_tokens = int(self.starts[-1])
    self.seq_len = seq_len
    if self.n_tokens < seq_len + 1:
      raise UserError(f'{split_dir}: {self.n_tokens} tokens, fewer than one window of '
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
                 workers: int = 0, prefetch: int = 2) -> grain.DataLoader:
  """An endless, shuffled grain loader of {'inputs', 'targets'}: int32 [devices, accum, batch, seq_len]."""
  source = TokenWindows(split_dir, seq_len)
  shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  per_process = local_devices * grad_accum * per_device_batch
  if len(source) // process_count < per_process:
    raise UserError(f'{split_dir}: {len(source)} windows of {seq_len + 1} tokens cannot fill '
                    f'one batch of {per_process} per process; lower train.per_device_batch')
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=True,
                                        num_epochs=None, seed=seed)
  shape = (local_devices, grad_accum, per_device_batch, seq_len + 1)
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[grain.transforms.Batch(per_process, drop_remainder=True),
                  _ToBatch(shape)],
      worker_count=workers, worker_buffer_size=prefetch)


class _ToBatch(grain.transforms.Map):
  def __init__(self, shape):
    self.shape = shape

  def map(self, windows):
    windows = windows.reshape(self.shape)
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
  mine = list(range(process_index, n_windows, process_count))
  per_batch = local_devices * batch
  n_batches = -(-(-(-n_windows // process_count)) // per_batch)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  for b in range(n_batches):
    x = np.zeros((per_batch, seq_len + 1), np.int32)
    w = np.zeros((per_batch, seq_len), np.float32)
    for row, i in enumerate(mine[b * per_batch:(b + 1) * per_batch]):
      start = i * seq_len
      window = source.tokens(start, min(start + seq_len + 1, source.n_tokens))
      x[row, :len(window)] = window
      w[row, :len(window) - 1] = 1.0
    x = x.reshape(local_devices, batch, seq_len + 1)
    yield {'inputs': x[..., :-1], 'targets': x[..., 1:],
           'weights': w.reshape(local_devices, batch, seq_len)}
