"""Duplicate documents: exact (a hash of the normalised text) and near (MinHash + LSH).

`data.dedup` = 'none' | 'exact' | 'near'. A document is a piece as `corpus` yields it, and
the first one in corpus order is kept. Exact: the 64-bit blake2b of the normalised text;
every later document with the same hash is removed. Near (after exact): MinHash signatures
of `data.near_ngram`-character shingles (`num_perm` 32-bit minima, computed by the Rust
library `rensa` from shingle hashes that numpy computes for a whole batch at once), banded
for LSH; documents that share a band key are candidates, and a candidate pair whose
signatures agree on at least `data.near_threshold` of their minima (the Jaccard estimate)
is joined; every document of a joined cluster but the first is removed.

Memory: the signatures and band keys are written to disk as they are made; afterwards each
band is sorted on its own (8 bytes and an 8-byte index a document) and candidates are
verified in chunks, so the peak is ~30 bytes a document, never the text.
"""

from __future__ import annotations

import hashlib

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


def near_removed(bands: list, sigs, removed: np.ndarray, threshold: float) -> None:
  """Marks NEAR in `removed` (in place) for near-duplicates of earlier documents.

  `bands`: each band's uint64 keys, an array or a file of them (read one at a time);
  `sigs`: the [n, NUM_PERM] uint32 signatures, or the file that holds them (mapped afresh
  for each chunk of candidates, so the pages read never pile up in memory). Documents
  already removed take no part.
  """
  n = len(removed)
  alive = np.flatnonzero(removed == KEEP)
  parent = np.arange(n, dtype=np.int64)
  edges = []
  for band in bands:
    col = (np.fromfile(band, np.uint64) if isinstance(band, str) else band)[alive]
    order = np.argsort(col, kind='stable')   # equal keys stay in corpus order
    same = col[order][1:] == col[order][:-1]
    a, c = alive[order[:-1][same]], alive[order[1:][same]]
    for i in range(0, len(a), _VERIFY_CHUNK):
      x, y = a[i:i + _VERIFY_CHUNK], c[i:i + _VERIFY_CHUNK]
      table = (np.memmap(sigs, np.uint32, 'r', shape=(n, NUM_PERM)) if isinstance(sigs, str)
               else sigs)
      agree = (table[x] == table[y]).mean(axis=1)
      del table
      ok = agree >= threshold
      edges.append(np.stack([x[ok], y[ok]], 1))
  pairs = np.unique(np.concatenate(edges), axis=0) if edges else np.zeros((0, 2), np.int64)

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for x, y in pairs:
    rx, ry = find(x), find(y)
    if rx != ry:
      parent[max(rx, ry)] = min(rx, ry)   # a cluster's root is its first document
  nodes = np.unique(pairs)
  roots = np.fromiter((find(i) for i in nodes), np.int64, len(nodes))
  removed[nodes[roots != nodes]] = NEAR
