"""SFT data through cached shard files: chat data tokenized and packed once, then mapped.

A full chat set (hundreds of thousands of conversations) costs minutes and GBs to read,
tokenize and pack. The first start does it and writes the packed rows under
<data dir>/sft/<key>/: train/ and val/, one .npy file per array (inputs, targets, weights,
segment_ids, positions; [rows, seq_len], in the smallest dtype that holds them) and
meta.json (the counts and the summary line) written last. The key hashes what decides the
rows: the chat files (paths, sizes, mtimes), the tokenizer's bytes, model.seq_len,
sft.long_policy, data.val_fraction and CODE_VERSION. A later start with the same key memory-
maps the files (np.load(mmap_mode='r')): no reading, no tokenizing, pages loaded as batches
touch them. Everything is written in a temporary directory and renamed, so a killed first
start leaves nothing a later one trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

import numpy as np

from zhgpt_jax import corpus

CODE_VERSION = 1
ARRAYS = ('inputs', 'targets', 'weights', 'segment_ids', 'positions')
SUFFIXES = ('.jsonl', '.jsonl.gz')


def cache_key(config, tokenizer_json: str) -> str:
  """The key of config.sft.data's packed rows for this tokenizer and these settings."""
  files = []
  for path in corpus.resolve_paths(config.sft.data, 'config.sft.data', SUFFIXES):
    st = os.stat(path)
    files.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
  inputs = dict(code=CODE_VERSION, files=files,
                tokenizer=hashlib.sha256(tokenizer_json.encode('utf-8')).hexdigest(),
                seq_len=config.model.seq_len, long_policy=config.sft.long_policy,
                val_fraction=config.data.val_fraction)
  return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _compact(name: str, array: np.ndarray) -> np.ndarray:
  """`array` in the smallest unsigned dtype that holds it (the loader casts back)."""
  if name == 'weights' or not array.size:
    return array.astype(np.uint8) if name == 'weights' else array
  top = int(array.max())
  if array.min() >= 0 and top < 1 << 16:
    return array.astype(np.uint16)
  return array.astype(np.int32)


def save(directory: str, splits: dict[str, dict[str, np.ndarray]], meta: dict) -> None:
  """Writes {split: rows} and meta.json to `directory` (atomically: a temporary directory,
  meta.json last, then renamed)."""
  tmp = f'{directory}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  for split, rows in splits.items():
    os.makedirs(os.path.join(tmp, split))
    for name in ARRAYS:
      np.save(os.path.join(tmp, split, f'{name}.npy'), _compact(name, rows[name]))
  with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump(meta, f, ensure_ascii=False, indent=1)
  if load(directory, meta['key']) is not None:   # another process got there first
    shutil.rmtree(tmp, ignore_errors=True)
    return
  shutil.rmtree(directory, ignore_errors=True)
  os.rename(tmp, directory)


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


def cached_rows(config, data_dir: str, tokenizer_json: str,
                build: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict, bool]:
  """({split: rows}, meta, reused): the packed rows of config.sft.data, from the cache
  under data_dir when it holds them for these inputs, else from `build()` (which returns
  ({split: rows}, meta)) and then saved there."""
  key = cache_key(config, tokenizer_json)
  directory = os.path.join(data_dir, 'sft', key)
  found = load(directory, key)
  if found is not None:
    return found[0], found[1], True
  splits, meta = build()
  meta = dict(meta, key=key, splits=list(splits))
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  save(directory, splits, meta)
  loaded = load(directory, key)
  return loaded[0], loaded[1], False
