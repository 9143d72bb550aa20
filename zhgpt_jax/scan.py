"""The first pass of `prepare`: count, deduplicate, and sample the tokenizer's training text.

One read of the corpus on every core (`worker_pool`: blocks of `sources.iter_blocks` parsed
in spawned processes) records, per document: its source, length, split, exact-dedup hash
and, for `data.dedup='near'`, its MinHash signature and LSH band keys (both to disk). Then:

  * `removed` (uint8 a document, `dedup.KEEP/EXACT/NEAR`) decides which documents the shards
    leave out; with the documents each block gave, it is all that the second pass needs;
  * the tokenizer sample: every train document has a second hash; the sample is the kept
    documents of smallest hash up to `tokenizer.max_train_chars` characters: a deterministic
    sample at rate max_train_chars / total over all sources alike, so each source's share of
    the sample is its share of the corpus. Only ~2x max_train_chars of candidates are held.

The result (without the sample) is cached in <data>/scan/, keyed by the inputs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import types
from typing import Callable, Iterator

import numpy as np
import tqdm

from zhgpt_jax import corpus, dedup, sources
from zhgpt_jax.config import UserError

_STATE: dict = {}   # a worker's data config and tokenizer, set by _init


def _init(data: dict, tok_json: str | None, serial_rust: bool) -> None:
  if serial_rust:
    # One process per core already: a Rust thread pool per worker would only oversubscribe.
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  _STATE['data'] = types.SimpleNamespace(**data)
  if tok_json is not None:
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    from zhgpt_jax import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    _STATE['tok'] = tokenizer_lib.as_plain_text(Tokenizer.from_str(tok_json))


def worker_state() -> dict:
  """{'data': the data config, 'tok': the plain-text tokenizer} in a pool worker."""
  return _STATE


def workers(config) -> int:
  """How many processes read and tokenize: config.data.tokenize_workers, 0 = every core."""
  if config.data.tokenize_workers < 0:
    raise UserError(f'config.data.tokenize_workers={config.data.tokenize_workers}: must be >= 0')
  return config.data.tokenize_workers or os.cpu_count() or 1


@contextlib.contextmanager
def worker_pool(config, tok_json: str | None = None) -> Iterator[Callable]:
  """Yields submit(fn, *args) -> a callable returning fn(*args), run by `workers(config)`
  spawned processes (1: a thread of this process, the Rust tokenizer on every core)."""
  n, data = workers(config), config.data.to_dict()
  if n == 1:
    _init(data, tok_json, serial_rust=False)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      yield lambda fn, *args: pool.submit(fn, *args).result
    return
  # spawn, not fork: the caller may have started JAX's threads, and a forked copy of a
  # multithreaded process can deadlock.
  with multiprocessing.get_context('spawn').Pool(n, _init, (data, tok_json, True)) as pool:
    yield lambda fn, *args: pool.apply_async(fn, args).get


def ordered(submit: Callable, fn: Callable, jobs, depth: int) -> Iterator[tuple]:
  """(job, fn(*job's args)) for `jobs` of (job, args), in order, at most `depth` in flight,
  so memory does not grow with the corpus."""
  in_flight = collections.deque()
  for job, args in jobs:
    in_flight.append((job, submit(fn, *args)))
    if len(in_flight) > depth:
      job, result = in_flight.popleft()
      yield job, result()
  while in_flight:
    job, result = in_flight.popleft()
    yield job, result()


def input_bytes(config) -> int:
  """The corpus files' size on disk: the total of the progress bars."""
  paths = (corpus.builtin_paths().values() if config.data.corpus == 'builtin'
           else [p for s in corpus.parse_sources(config.data.corpus) for p in s.paths])
  return sum(os.path.getsize(p) for p in paths)


def sample_hash(text: str) -> int:
  digest = hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=8,
                           person=b'sample').digest()
  return int.from_bytes(digest, 'little')


def _scan_block(block: sources.Block, sample_below: float, near: tuple | None) -> dict:
  """A worker's pass over one block: per-document arrays, sample candidates, skip counts."""
  stats = corpus.CorpusStats()
  docs = sources.block_documents(block, _STATE['data'], stats)
  texts = [t for t, _ in docs]
  out = dict(stats=stats, n=len(docs),
             chars=np.fromiter(map(len, texts), np.uint32, len(docs)),
             hash=np.fromiter(map(dedup.text_hash, texts), np.uint64, len(docs)),
             val=np.fromiter((v for _, v in docs), bool, len(docs)), sample=[],
             val_docs=[t for t, v in docs if v][:20])
  for i, (text, val) in enumerate(docs):
    h = sample_hash(text)
    if not val and h < sample_below:
      out['sample'].append((h, i, text))
  if near:
    ngram, bands, rows = near
    out['sigs'] = dedup.signatures(texts, ngram)
    out['keys'] = dedup.band_keys(out['sigs'], bands, rows)
  return out


@dataclasses.dataclass
class Scan:
  """What the first pass found. Arrays are per document, in corpus order."""
  block_docs: list[int]            # documents each block gave
  source: np.ndarray               # uint16: the source (index into parse_sources) of each
  chars: np.ndarray
  val: np.ndarray
  removed: np.ndarray              # uint8 dedup codes
  stats: corpus.CorpusStats
  sample: list[str]                # the tokenizer sample (empty when read from the cache)
  sample_sources: list[int]
  val_docs: list[str]              # the first val documents (up to 1000) met

  def summary_counts(self, n_sources: int) -> list[dict]:
    """Per source: documents and characters read, and exact/near duplicates removed."""
    out = []
    for s in range(n_sources):
      mine = self.source == s
      out.append(dict(read_documents=int(mine.sum()), read_characters=int(self.chars[mine].sum()),
                      exact_duplicates=int((self.removed[mine] == dedup.EXACT).sum()),
                      near_duplicates=int((self.removed[mine] == dedup.NEAR).sum())))
    return out


class _Sample:
  """Train documents of smallest sample hash, max_chars of them once duplicates are out;
  at most 2x max_chars held."""

  def __init__(self, max_chars: int):
    self.max_chars, self.items, self.chars, self.below = max_chars, [], 0, 2**64

  def add(self, h: int, index: int, source: int, text: str) -> None:
    if h < self.below:
      self.items.append((h, index, source, text))
      self.chars += len(text)
      if self.chars > 2 * self.max_chars:
        # A margin over max_chars: some of these may turn out to be duplicates.
        self.items.sort()
        self.items, self.chars = self._prefix(self.items, 1.5 * self.max_chars)
        self.below = self.items[-1][0] + 1

  def _prefix(self, items, limit):
    kept, chars = [], 0
    for item in items:
      if chars >= limit:
        break
      kept.append(item)
      chars += len(item[3])
    return kept, chars

  def final(self, removed: np.ndarray) -> list[tuple]:
    items = sorted(i for i in self.items if removed[i[1]] == dedup.KEEP)
    return self._prefix(items, self.max_chars)[0]


def scan(config, n_heldout: int, want_sample: bool, progress: bool, work_dir: str) -> Scan:
  """Runs the first pass (see the module docstring); scratch files go under work_dir."""
  data = config.data
  near = None
  if data.dedup == 'near':
    near = (data.near_ngram, *dedup.lsh_params(data.near_threshold))
  cap = config.tokenizer.max_train_chars
  total = input_bytes(config)
  # Candidates sent back by the workers: ~16x the needed rate (a character is 1 to ~6 bytes
  # of JSON), so the sample is exact while the traffic stays a small part of the corpus.
  sample_below = (min(1.0, 16 * cap / max(1, total)) * 2.0**64) if want_sample else 0.0
  stats = corpus.CorpusStats(text_field=data.text_field)
  if data.corpus == 'builtin':
    _ = list(corpus.builtin_documents(data, stats, n_heldout))  # the builtin skips, once
  block_docs, val_docs = [], []
  sample = _Sample(cap)
  os.makedirs(work_dir, exist_ok=True)
  # The per-document arrays go to disk as they come (memory stays flat while the workers
  # run); LSH keys band-major, so that each band is read back alone.
  per_doc = {'source': np.uint16, 'chars': np.uint32, 'hash': np.uint64, 'val': np.bool_}
  names = [*per_doc, *(['sigs', *(f'band{b}' for b in range(near[1]))] if near else [])]
  files = {k: open(os.path.join(work_dir, f'{k}.bin'), 'wb') for k in names}
  n_docs = 0
  blocks = ((b, (b, sample_below, near)) for b in sources.iter_blocks(data, n_heldout))
  try:
    with worker_pool(config) as submit, tqdm.tqdm(
        total=total, unit='B', unit_scale=True, disable=not progress, desc='scan') as bar:
      for block, out in ordered(submit, _scan_block, blocks, 2 * workers(config)):
        bar.update(block.size)
        stats.merge(out['stats'])
        block_docs.append(out['n'])
        out['source'] = np.full(out['n'], block.source, np.uint16)
        val_docs.extend(out['val_docs'][:1000 - len(val_docs)])
        for h, i, text in out['sample']:
          sample.add(h, n_docs + i, block.source, text)
        for k, f in files.items():
          (out['keys'][:, int(k[4:])] if k.startswith('band') else out[k]).tofile(f)
        n_docs += out['n']
  finally:
    for f in files.values():
      f.close()
  if not n_docs:
    raise UserError(f'config.data.corpus={data.corpus!r}: no usable documents '
                    f'({stats.summary()})')
  arrays = {k: np.fromfile(files[k].name, t) for k, t in per_doc.items() if k != 'hash'}
  removed = (dedup.exact_removed(np.fromfile(files['hash'].name, np.uint64))
             if data.dedup != 'none' else np.zeros(n_docs, np.uint8))
  if near:
    bands = [files[f'band{b}'].name for b in range(near[1])]
    dedup.near_removed(bands, files['sigs'].name, removed, data.near_threshold)
  shutil.rmtree(work_dir, ignore_errors=True)
  chosen = sample.final(removed)
  return Scan(block_docs=block_docs, **arrays, removed=removed, stats=stats,
              sample=[t for *_, t in chosen], sample_sources=[s for _, _, s, _ in chosen],
              val_docs=val_docs)


def save(result: Scan, directory: str, key: str) -> None:
  """Writes what the second pass needs (block_docs, removed, counts) to `directory`."""
  tmp = f'{directory}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.save(os.path.join(tmp, 'removed.npy'), result.removed)
  np.save(os.path.join(tmp, 'source.npy'), result.source)
  np.save(os.path.join(tmp, 'chars.npy'), result.chars)
  np.save(os.path.join(tmp, 'val.npy'), result.val)
  with open(os.path.join(tmp, 'scan.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(key=key, block_docs=result.block_docs), f)   # last: seals the scan
  shutil.rmtree(directory, ignore_errors=True)
  os.rename(tmp, directory)


def load(directory: str, key: str) -> Scan | None:
  """The saved scan for `key`, or None."""
  try:
    with open(os.path.join(directory, 'scan.json'), encoding='utf-8') as f:
      meta = json.load(f)
    if meta.get('key') != key:
      return None
    arrays = {k: np.load(os.path.join(directory, f'{k}.npy'))
              for k in ('removed', 'source', 'chars', 'val')}
  except (OSError, ValueError):
    return None
  return Scan(block_docs=meta['block_docs'], stats=corpus.CorpusStats(), sample=[],
              sample_sources=[], val_docs=[], **arrays)
