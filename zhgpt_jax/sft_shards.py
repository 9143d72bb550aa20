"""SFT data through cached shard files: chat data tokenized and packed once, then mapped.

A full chat set (hundreds of thousands of conversations) costs minutes to read, tokenize and
pack. The first start does it and writes the packed rows under <data dir>/sft/<key>/:
train/ and val/, one .npy file per array (inputs, targets, weights, segment_ids, positions;
[rows, seq_len], uint16 where the vocabulary and the context allow, weights uint8) and
meta.json (the counts and the summary line). The key hashes what decides the rows: the chat
files (paths, sizes, mtimes), the tokenizer's bytes, model.seq_len, sft.long_policy,
data.val_fraction and CODE_VERSION. A later start with the same key memory-maps the files
(np.load(mmap_mode='r')): no reading, no tokenizing, pages loaded as batches touch them.

The first start streams, so its memory does not grow with the chat set beyond ~60 bytes a
conversation (the lengths, splits and hashes that packing needs):
  1. the files are cut into blocks (~1 MiB of input, `formats.file_parts`) that a pool of
     processes on every core (`pool.worker_pool`, as `prepare` uses) parses, tokenizes and
     fits (`sft_format.fitted_conversations`); each conversation's ids and weights are
     appended, in file order, to two scratch files, and its length, split and hash kept;
  2. best-fit decreasing packs each split from those lengths (`sft_format.pack_members`,
     the same rows, in the same order, as packing everything in memory);
  3. the rows are written a block of rows at a time, each conversation read back from a map
     of the scratch files opened for that block only.
Everything is written in a temporary directory, meta.json last, and renamed into place, so
a start killed at any point (kill -9 included) leaves nothing a later start trusts; the
next build removes such leftovers of dead processes of this host.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
import tqdm

from zhgpt_jax import files
from zhgpt_jax import formats, pool, sft_format
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.sft_format import SftStats
from zhgpt_jax.chatml import ChatEncoder
from zhgpt_jax.config import disk_errors

CODE_VERSION = 1
ARRAYS = ('inputs', 'targets', 'weights', 'segment_ids', 'positions')
BLOCK_BYTES = 1 << 20    # input bytes a worker parses and tokenizes at a time
BLOCK_ROWS = 1024        # rows written at a time


def cache_key(config, tokenizer_json: str) -> str:
  """The key of config.sft.data's packed rows for this tokenizer and these settings."""
  files = []
  for path in sft_format.data_paths(config.sft.data, config.data.split):
    st = os.stat(path)
    files.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
  inputs = dict(code=CODE_VERSION, files=files,
                tokenizer=hashlib.sha256(tokenizer_json.encode('utf-8')).hexdigest(),
                seq_len=config.model.seq_len, long_policy=config.sft.long_policy,
                val_fraction=config.data.val_fraction)
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def row_dtype(bound: int) -> np.dtype:
  """The dtype of a rows array whose values are in [0, bound)."""
  return np.dtype(np.uint16) if bound <= 1 << 16 else np.dtype(np.int32)


# ----------------------------------------------------------------------------- pass 1

def _encode_block(part: formats.Part, max_tokens: int, policy: str, val_fraction: float,
                  dtype: str) -> dict:
  """A pool worker's fitted conversations of one Part of a chat file, as arrays."""
  state = pool.worker_state()
  if state.get('chat_tok') is not state['tok']:   # the tokenizer of this pool
    state['chat'], state['chat_tok'] = ChatEncoder(state['tok']), state['tok']
  stats = SftStats()
  fitted = sft_format.fitted_conversations(formats.part_items(part), part.path, state['chat'],
                                            stats, max_tokens, policy, val_fraction)
  join = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)
  return dict(stats=stats,
              ids=join([f.encoded.ids for f in fitted], dtype),
              weights=join([f.encoded.weights for f in fitted], np.uint8),
              lengths=np.array([len(f.encoded.ids) for f in fitted], np.int32),
              val=np.array([f.val for f in fitted], bool),
              hashes=np.array([f.hash for f in fitted], np.uint64))


def _tokenize(config, tokenizer_json: str, tmp: str, dtype: np.dtype, progress: bool):
  """Pass 1: every conversation's ids and weights appended to tmp/tokens.bin and
  tmp/weights.bin in file order; returns (stats, lengths, val, hashes), one entry each."""
  paths = sft_format.data_paths(config.sft.data, config.data.split)
  stats = SftStats()
  parts = {'lengths': [], 'val': [], 'hashes': []}
  args = (config.model.seq_len + 1, config.sft.long_policy, config.data.val_fraction, dtype.str)

  def jobs():
    for path in paths:
      stats.file(path)   # every file is listed, even one that gives nothing
      for part in sft_format.file_parts(path, BLOCK_BYTES):
        yield part.size, (part, *args)

  with open(os.path.join(tmp, 'tokens.bin'), 'wb') as tokens, \
      open(os.path.join(tmp, 'weights.bin'), 'wb') as weights, \
      pool.worker_pool(config, tokenizer_json) as submit, \
      tqdm.tqdm(total=sum(os.path.getsize(p) for p in paths), unit='B', unit_scale=True,
                disable=not progress, desc='sft data') as bar:
    for size, out in pool.ordered(submit, _encode_block, jobs(), 2 * pool.workers(config)):
      bar.update(size)
      stats.merge(out['stats'])
      tokens.write(out['ids'].tobytes())
      weights.write(out['weights'].tobytes())
      for name, kept in parts.items():
        kept.append(out[name])
  lengths, val, hashes = (np.concatenate(parts[k]) if parts[k] else np.zeros(0, dt)
                          for k, dt in (('lengths', np.int32), ('val', bool),
                                        ('hashes', np.uint64)))
  return stats, lengths, val, hashes


# ----------------------------------------------------------------------------- pass 2

def _npy_file(path: str, dtype: np.dtype, shape: tuple):
  """`path` opened for writing an .npy array of `shape` row block by row block (the header
  np.save writes, then the data as it comes)."""
  f = open(path, 'wb')  # pylint: disable=consider-using-with
  np.lib.format.write_array_header_1_0(f, {'descr': np.lib.format.dtype_to_descr(dtype),
                                           'fortran_order': False, 'shape': shape})
  return f


def _write_rows(directory: str, tmp: str, index: np.ndarray, offsets: np.ndarray,
                seq_len: int, pad_id: int, dtype: np.dtype) -> tuple[int, int, int]:
  """Packs the conversations `index` (in file order) into directory/*.npy; returns their
  (conversations, rows, tokens)."""
  sizes = offsets[index + 1] - offsets[index] - 1   # positions a conversation fills
  members, starts = sft_format.pack_members(sizes, seq_len)
  n_rows = len(starts) - 1
  most = int(np.diff(starts).max()) if n_rows else 0
  dtypes = dict(inputs=dtype, targets=dtype, weights=np.dtype(np.uint8),
                segment_ids=row_dtype(most + 1), positions=row_dtype(seq_len))
  os.makedirs(directory)
  files = {k: _npy_file(os.path.join(directory, f'{k}.npy'), dt, (n_rows, seq_len))
           for k, dt in dtypes.items()}
  try:
    for r0 in range(0, n_rows, BLOCK_ROWS):
      # Maps opened for one block: the pages it touched leave this process's RSS with it.
      ids = np.memmap(os.path.join(tmp, 'tokens.bin'), dtype, 'r')
      weights = np.memmap(os.path.join(tmp, 'weights.bin'), np.uint8, 'r')
      rows = [index[members[starts[r]:starts[r + 1]]].tolist()
              for r in range(r0, min(r0 + BLOCK_ROWS, n_rows))]
      item = lambda c: (ids[offsets[c]:offsets[c + 1]], weights[offsets[c]:offsets[c + 1]])
      block = sft_format.fill_rows(rows, seq_len, pad_id, item)
      for k, f in files.items():
        f.write(block[k].astype(dtypes[k]).tobytes())
      del ids, weights, item
  finally:
    for f in files.values():
      f.close()
  return len(index), n_rows, int(sizes.sum())


def _build(config, tokenizer, tmp: str, progress: bool) -> dict:
  """Both passes into `tmp`; returns meta (without the key)."""
  seq_len = config.model.seq_len
  dtype = row_dtype(tokenizer.get_vocab_size())
  stats, lengths, val, hashes = _tokenize(config, tokenizer.to_str(), tmp, dtype, progress)
  val = sft_format.final_val(val, hashes)
  sft_format.check_usable(config.sft.data, stats, int((~val).sum()), seq_len)
  offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
  pad = tok_lib.special_ids(tokenizer).pad
  counts = {split: _write_rows(os.path.join(tmp, split), tmp, np.flatnonzero(mask), offsets,
                               seq_len, pad, dtype)
            for split, mask in (('train', ~val), ('val', val))}
  for name in ('tokens.bin', 'weights.bin'):
    os.remove(os.path.join(tmp, name))
  return dict(summary=sft_format.summary(stats, seq_len, counts['train'], counts['val'][:2]),
              splits=list(counts))


def build(config, tokenizer, directory: str, key: str, progress: bool = False) -> None:
  """Writes config.sft.data's packed rows and meta.json to `directory`, atomically."""
  files.sweep(os.path.dirname(directory))   # a killed build's, of any key
  tmp = files.temp_path(directory)
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    t0 = time.perf_counter()
    meta = dict(_build(config, tokenizer, tmp, progress), key=key,
                seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
      json.dump(meta, f, ensure_ascii=False, indent=1)
    if load(directory, key) is None:   # else another process got there first
      shutil.rmtree(directory, ignore_errors=True)
      os.rename(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load(directory: str, key: str) -> tuple[dict, dict] | None:
  """({split: memory-mapped rows}, meta) saved for `key`, or None."""
  try:
    with open(os.path.join(directory, 'meta.json'), encoding='utf-8') as f:
      meta = json.load(f)
    if meta.get('key') != key:
      return None
    splits = {split: {name: np.load(os.path.join(directory, split, f'{name}.npy'),
                                    mmap_mode='r') for name in ARRAYS}
              for split in meta['splits']}
  except (OSError, ValueError):
    return None
  return splits, meta


def cached_rows(config, data_dir: str, tokenizer, progress: bool = False
                ) -> tuple[dict, dict, bool]:
  """({split: rows}, meta, reused): the packed rows of config.sft.data, memory-mapped from
  the cache under data_dir, built there first (`build`) unless it holds them for these
  inputs. UserError when the data has no usable conversation."""
  key = cache_key(config, tokenizer.to_str())
  directory = os.path.join(data_dir, 'sft', key)
  found = load(directory, key)
  if found is not None:
    return found[0], found[1], True
  with disk_errors('building the SFT rows', 'training stopped before its first step. Nothing '
                   'half-written is kept or used; free the space or fix the permission (or '
                   'set config.data.cache_dir to a writable directory) and run the same '
                   'command', os.path.dirname(directory)):
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    build(config, tokenizer, directory, key, progress)
  splits, meta = load(directory, key)
  return splits, meta, False
