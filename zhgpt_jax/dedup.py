"""Duplicate documents: exact (a hash of the normalised text) and near (MinHash + LSH).

`data.dedup` = 'none' | 'exact' | 'near'. A document is a piece as `corpus` yields it, and
the first one in corpus order is kept. Exact: the 64-bit blake2b of the normalised text;
every later document with the same hash is removed. Near (after exact): MinHash signatures
of `data.near_ngram`-character shingles (`num_perm` 32-bit minima, computed by the Rust
library `rensa` from shingle hashes that numpy computes for a whole batch at once), banded
for LSH; documents that share a band key are candidates, and a candidate pair whose
signatures agree on at least `data.near_threshold` of their minima (the Jaccard estimate)
is joined; every document of a joined cluster but the first is removed.

Memory: the signatures (512 bytes a document) and band keys (8 bytes a document a band)
are written to disk by the scan as they are made, never held. Afterwards each band is read
and sorted on its own, and only the rows of a chunk of 8,192 candidate pairs are read from the
signature file (with pread: a memory map of that file became resident as a whole, since the
kernel maps ~64 KiB around each page touched, and grew with the corpus: 849 MB at 3 GB).
Pairs an earlier band already joined are not verified again, and clusters are joined band
by band in a union-find array, so no list of pairs is kept either. What grows with the
corpus is per-document arrays, freed when dedup ends: the near pass peaks at 36 bytes a
document (tracemalloc, 1M documents: a band's keys, their order and the sorted keys, 8 bytes
each; the union-find array and the live documents' index, 4 each), the exact pass at 42
(np.unique of the 8-byte hashes); never the text.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

NUM_PERM = 128
SEED = 1
KEEP, EXACT, NEAR = 0, 1, 2          # codes of `removed`
_PRIME = np.uint64(0x100000001B3)     # FNV's 64-bit prime: the rolling shingle hash
_VERIFY_CHUNK = 1 << 13


def text_hash(text: str) -> int:
  """The 64-bit hash that exact deduplication compares."""
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=8,
                                        person=b'dedup').digest(), 'little')


def lsh_params(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
  """(bands, rows): the most rows a band (fewest false candidates) such that a pair of
  Jaccard `threshold` still becomes a candidate with probability >= 0.995."""
  best = (num_perm, 1)
  for rows in range(1, num_perm + 1):
    bands = num_perm // rows
    if 1 - (1 - threshold**rows)**bands >= 0.995:
      best = (bands, rows)
  return best


def signatures(texts: list[str], ngram: int, num_perm: int = NUM_PERM) -> np.ndarray:
  """uint32 [len(texts), num_perm] MinHash signatures of each text's character n-grams (a
  text shorter than `ngram` is one shingle)."""
  import rensa  # pylint: disable=import-outside-toplevel  (only 'near' needs it)
  if not texts:
    return np.zeros((0, num_perm), np.uint32)
  joined = '\x00'.join(texts) + '\x00' * ngram
  cp = np.frombuffer(joined.encode('utf-32-le', 'surrogatepass'), np.uint32).astype(np.uint64)
  span = len(cp) - ngram
  h = np.zeros(span, np.uint64)
  for k in range(ngram):  # polynomial hash of every window of `ngram` code points
    h = h * _PRIME + cp[k:k + span]
  lens = np.fromiter(map(len, texts), np.int64, len(texts))
  starts = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
  counts = np.maximum(1, lens - ngram + 1)
  offsets = np.concatenate([[0], np.cumsum(counts)])
  index = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])
  matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
      h[index], offsets.astype(np.uint64), num_perm, SEED)
  return np.asarray(matrix.to_rows(), np.uint32).reshape(len(texts), num_perm)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
  """uint64 [n, bands]: a hash of each band's `rows` minima."""
  keys = np.zeros((len(sigs), bands), np.uint64)
  for r in range(rows):
    keys = keys * _PRIME + sigs[:, r:bands * rows:rows].astype(np.uint64) + np.uint64(r + 1)
  return keys


def exact_removed(hashes: np.ndarray) -> np.ndarray:
  """uint8 codes: EXACT for every document whose hash an earlier document had, else KEEP."""
  removed = np.full(len(hashes), EXACT, np.uint8)
  removed[np.unique(hashes, return_index=True)[1]] = KEEP  # first occurrences
  return removed


def _rows_reader(sigs):
  """rows(indices) -> those documents' signatures: from the array, or read from the file
  row by row. Not a memory map: the kernel maps ~64 KiB around every page a map touches
  ("fault-around"), so random rows of a mapped file soon make all of it resident."""
  if not isinstance(sigs, str):
    return lambda idx: sigs[idx], lambda: None
  fd, size = os.open(sigs, os.O_RDONLY), NUM_PERM * 4

  def rows(idx):
    data = b''.join([os.pread(fd, size, int(i) * size) for i in idx])
    return np.frombuffer(data, np.uint32).reshape(len(idx), NUM_PERM)
  return rows, lambda: os.close(fd)


def _roots(parent: np.ndarray, nodes: np.ndarray) -> np.ndarray:
  """The root (a cluster's first document) of each of `nodes`, by pointer jumping."""
  nodes = parent[nodes]
  while True:
    up = parent[nodes]
    if (up == nodes).all():
      return nodes
    nodes = up


def near_removed(bands: list, sigs, removed: np.ndarray, threshold: float) -> None:
  """Marks NEAR in `removed` (in place) for near-duplicates of earlier documents.

  `bands`: each band's uint64 keys, an array or a file of them (read one at a time);
  `sigs`: the [n, NUM_PERM] uint32 signatures, or the file that holds them (only the rows
  of a chunk of candidates are read). Documents already removed take no part. Pairs that
  an earlier band already joined are not verified again, and clusters are merged band by
  band (union-find), so no list of pairs is kept.
  """
  n = len(removed)
  index = np.int32 if n < 2**31 else np.int64
  alive = np.flatnonzero(removed == KEEP).astype(index)
  parent = np.arange(n, dtype=index)   # union-find; a cluster's root is its first document
  rows, close = _rows_reader(sigs)

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  try:
    for band in bands:
      col = (np.fromfile(band, np.uint64) if isinstance(band, str) else band)[alive]
      order = np.argsort(col, kind='stable')   # equal keys stay in corpus order
      col = col[order]
      same = np.flatnonzero(col[1:] == col[:-1])
      del col
      a, c = alive[order[same]], alive[order[same + 1]]
      del order, same
      for i in range(0, len(a), _VERIFY_CHUNK):
        x, y = a[i:i + _VERIFY_CHUNK], c[i:i + _VERIFY_CHUNK]
        new = _roots(parent, x) != _roots(parent, y)   # not joined by an earlier band yet
        x, y = x[new], y[new]
        if not len(x):
          continue
        need, where = np.unique(np.concatenate([x, y]), return_inverse=True)
        table = rows(need)
        agree = (table[where[:len(x)]] == table[where[len(x):]]).mean(axis=1)
        for p, q in zip(x[agree >= threshold].tolist(), y[agree >= threshold].tolist()):
          rp, rq = find(p), find(q)
          if rp != rq:
            parent[max(rp, rq)] = min(rp, rq)
  finally:
    close()
  roots = _roots(parent, np.arange(n, dtype=index))
  removed[roots != np.arange(n)] = NEAR
