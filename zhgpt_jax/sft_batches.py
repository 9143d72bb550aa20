"""Packed chat rows to training: the same grain pipeline as pretraining, over rows.

The rows (inputs, targets, weights, segment_ids, positions; [rows, seq_len]) come from
`sft_format` (packed in memory) or `sft_shards` (memory-mapped cache files); any integer
dtype is read, and batches are cast to int32 (weights to float32).
"""

from __future__ import annotations

import functools
from typing import Iterator

import grain
import numpy as np

from zhgpt_jax import data as data_lib
from zhgpt_jax.config import UserError


class PackedRows(grain.sources.RandomAccessDataSource):
  """Row i of precomputed packed arrays, as a dict of [seq_len] arrays."""

  def __init__(self, rows: dict[str, np.ndarray], name: str):
    self.rows, self.name = rows, name

  def __len__(self) -> int:
    return len(self.rows['inputs'])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[int(index)] for k, v in self.rows.items()}

  def __repr__(self) -> str:
    # grain checks a restored iterator against the source by repr; make it stable.
    return f'PackedRows({self.name}: {len(self)} rows of {self.rows["inputs"].shape[1]})'


def _to_batch(rows: dict[str, np.ndarray], shape) -> dict[str, np.ndarray]:
  """Stacked rows [n, L] -> [devices, accum, batch, L]; weights as float32."""
  return {k: v.reshape(shape).astype(np.float32 if k == 'weights' else np.int32)
          for k, v in rows.items()}


def train_loader(rows: dict[str, np.ndarray], name: str, *, per_device_batch: int,
                 grad_accum: int, local_devices: int, seed: int, process_index: int,
                 process_count: int, workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
  """An endless grain dataset of shuffled packed rows, [devices, accum, batch, seq_len] each.

  As pretraining (`data.process_batches`): one global shuffled order, reshuffled every
  epoch, each process reading its own slice of every global batch.
  """
  source = PackedRows(rows, name)
  per_process = local_devices * grad_accum * per_device_batch
  if len(source) // process_count < per_process:
    raise UserError(f'sft data: {len(source)} packed rows cannot fill a batch of '
                    f'{per_process} rows on each of {process_count} processes; lower '
                    'train.per_device_batch or add data')
  shape = (local_devices, grad_accum, per_device_batch, rows['inputs'].shape[1])
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  return data_lib.process_batches(
      ds, len(source), per_process, functools.partial(_to_batch, shape=shape),
      process_index=process_index, process_count=process_count, workers=workers,
      prefetch=prefetch)


def eval_batches(rows: dict[str, np.ndarray], *, batch: int, local_devices: int,
                 process_index: int, process_count: int, max_batches: int = 0) -> Iterator[dict]:
  """One in-order pass over packed rows as [devices, batch, seq_len] dicts.

  Process p takes rows p, p + P, ... (`data.eval_rows`); zero-weight padding rows fill the
  last batch, and every process yields the same number of batches.
  """
  n, seq_len = rows['inputs'].shape
  per_batch = local_devices * batch
  for take in data_lib.eval_rows(n, per_batch, process_index, process_count, max_batches):
    out = {}
    for k, v in rows.items():
      x = np.zeros((per_batch, seq_len), np.float32 if k == 'weights' else np.int32)
      x[:len(take)] = v[take]
      out[k] = x.reshape(local_devices, batch, seq_len)
    yield out
