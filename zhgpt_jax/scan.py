"""The first pass of `prepare`: count, deduplicate, and sample the tokenizer's training text.

One read of the corpus on every core (`pool.worker_pool`: blocks of `documents.iter_blocks` parsed
in spawned processes) records, per document: its source, length, split, exact-dedup hash
and, for `data.dedup='near'`, its MinHash signature and LSH band keys (both to disk). Then:

  * `removed` (uint8 a document, `dedup.KEEP/EXACT/NEAR`) decides which documents the shards
    leave out; with the documents each block gave, it is all that the second pass needs;
  * the tokenizer sample: every train document has a second hash; the sample is the kept
    documents of smallest hash up to `tokenizer.max_train_chars` characters: a deterministic
    sample at rate max_train_chars / total over all sources alike, so each source's share of
    the sample is its share of the corpus. Only ~2x max_train_chars of candidates are held.

Everything per document goes to scratch files as it comes (main-process memory while the
workers run: the sample and a few blocks in flight, not the corpus). With a key, a
checkpoint (the files' sizes, the counts) is written every CHECKPOINT_BLOCKS blocks: a scan
killed at any point (kill -9 included) continues from it when run again (`scan: resuming at
block B`), the sample and the first val documents replayed from their logs, and its result
is that of an uninterrupted scan. The result (without the sample) is cached in <data>/scan/,
keyed by the inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Iterator

import numpy as np
import tqdm

from zhgpt_jax import files
from zhgpt_jax import builtin_corpus, corpus, dedup, documents, pool
from zhgpt_jax.config import UserError

def input_bytes(config) -> int:
  """The corpus files' size on disk: the total of the progress bars."""
  paths = [p for s in documents.sources(config.data.corpus, split=config.data.split)
           for p in s.paths]
  return sum(os.path.getsize(p) for p in paths)


def sample_hash(text: str) -> int:
  digest = hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=8,
                           person=b'sample').digest()
  return int.from_bytes(digest, 'little')


def _scan_block(block: documents.Block, sample_below: float, near: tuple | None) -> dict:
  """A worker's pass over one block: per-document arrays, sample candidates, skip counts."""
  stats = corpus.CorpusStats()
  docs = documents.block_documents(block, pool.worker_state()['data'], stats)
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

  def add(self, h: int, index: int, source: int, text: str) -> bool:
    """Adds a candidate; False if it cannot be in the sample (so need not be logged)."""
    if h >= self.below:
      return False
    self.items.append((h, index, source, text))
    self.chars += len(text)
    if self.chars > 2 * self.max_chars:
      # A margin over max_chars: some of these may turn out to be duplicates.
      self.items.sort()
      self.items, self.chars = self._prefix(self.items, 1.5 * self.max_chars)
      self.below = self.items[-1][0] + 1
    return True

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


# A checkpoint every this many blocks (~1 MiB each): a killed scan loses at most these
# (and the blocks in flight) of work; one costs a flush of the scratch files and ~1 KB JSON.
CHECKPOINT_BLOCKS = 4
_PER_DOC = {'source': np.uint16, 'chars': np.uint32, 'hash': np.uint64, 'val': np.bool_}


def stats_from_json(saved: dict, text_field: str) -> corpus.CorpusStats:
  """CorpusStats back from its to_json() (a checkpoint's)."""
  stats = corpus.CorpusStats(text_field=text_field)
  for path, f in saved.items():
    fs = stats.file(path)
    fs.documents, fs.characters = f['documents'], f['characters']
    fs.skipped.update(f['skipped'])
  return stats


def _line(record) -> bytes:
  return json.dumps(record, ensure_ascii=False).encode('utf-8', 'surrogatepass') + b'\n'


def _records(path: str) -> Iterator:
  with open(path, 'rb') as f:
    for line in f:
      yield json.loads(line.decode('utf-8', 'surrogatepass'))


def read_progress(directory: str) -> dict | None:
  """directory/progress.json (a resumable pass's checkpoint), None if missing or unreadable."""
  try:
    with open(os.path.join(directory, 'progress.json'), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_progress(directory: str, state: dict) -> None:
  """Writes directory/progress.json atomically (a temporary file renamed over it)."""
  files.write_json(os.path.join(directory, 'progress.json'), state, indent=None)


def _resume_state(work_dir: str, ident: dict) -> dict | None:
  """The checkpoint in work_dir if it was made for `ident` and its files are all there."""
  state = read_progress(work_dir)
  if state is None or state.get('ident') != json.loads(json.dumps(ident)):
    return None
  for name, size in state['sizes'].items():
    path = os.path.join(work_dir, f'{name}.bin')
    if not os.path.isfile(path) or os.path.getsize(path) < size:
      return None
  return state


def _checkpoint(work_dir: str, files: dict, state: dict) -> None:
  for f in files.values():
    f.flush()   # to the OS: enough for kill -9
  state['sizes'] = {k: f.tell() for k, f in files.items()}
  write_progress(work_dir, state)


def scan(config, exclude: frozenset[str], want_sample: bool, progress: bool, work_dir: str,
         key: str | None = None) -> Scan:
  """Runs the first pass (see the module docstring); scratch files go under work_dir.

  With a `key` (of the inputs), a checkpoint is written to work_dir every
  CHECKPOINT_BLOCKS blocks, and a scan killed at any point (kill -9 included) and started again
  with the same key, work_dir and settings continues from its last checkpoint, printing from
  which block; its result is that of an uninterrupted scan. `exclude`: the builtin reviews
  kept out (`documents`)."""
  data = config.data
  near = None
  if data.dedup == 'near':
    near = (data.near_ngram, *dedup.lsh_params(data.near_threshold))
  cap = config.tokenizer.max_train_chars
  total = input_bytes(config)
  # Candidates sent back by the workers: ~16x the needed rate (a character is 1 to ~6 bytes
  # of JSON), so the sample is exact while the traffic stays a small part of the corpus.
  sample_below = (min(1.0, 16 * cap / max(1, total)) * 2.0**64) if want_sample else 0.0
  ident = dict(key=key, sample_below=sample_below, cap=cap, near=near)
  state = _resume_state(work_dir, ident) if key else None
  if state is None:
    shutil.rmtree(work_dir, ignore_errors=True)
    state = dict(ident=ident, blocks=0, docs=0, sizes={}, stats=None)
  os.makedirs(work_dir, exist_ok=True)
  # Everything per document goes to disk as it comes (memory stays flat while the workers
  # run): the arrays, LSH keys band-major (each band is read back alone), the documents
  # each block gave, and the sample's and val documents' logs (replayed on a resume).
  names = [*_PER_DOC, *(['sigs', *(f'band{b}' for b in range(near[1]))] if near else []),
           'blocks', 'sample', 'val_docs']
  files = {}
  for k in names:
    files[k] = open(os.path.join(work_dir, f'{k}.bin'), 'r+b' if k in state['sizes'] else 'wb')
    files[k].truncate(state['sizes'].get(k, 0))   # cut back what came after the checkpoint
    files[k].seek(0, os.SEEK_END)
  sample = _Sample(cap)
  start, n_docs = state['blocks'], state['docs']
  if state['stats'] is not None:
    stats = stats_from_json(state['stats'], data.text_field)
    files['sample'].flush()
    for h, i, source, text in _records(files['sample'].name):
      sample.add(h, i, source, text)
    val_docs = list(_records(files['val_docs'].name))
    print(f'scan: resuming at block {start:,} of the corpus ({n_docs:,} documents scanned)',
          flush=True)
  else:
    stats, val_docs = corpus.CorpusStats(text_field=data.text_field), []
    if data.corpus == 'builtin':
      _ = list(builtin_corpus.documents(data, stats, exclude))  # the builtin skips, once
  try:
    with pool.worker_pool(config) as submit, tqdm.tqdm(
        total=total, unit='B', unit_scale=True, disable=not progress, desc='scan') as bar:

      def blocks():
        for i, b in enumerate(documents.iter_blocks(data, exclude)):
          if i >= start:
            yield b, (b, sample_below, near)
          else:
            bar.update(b.size)

      for n_blocks, (block, out) in enumerate(
          pool.ordered(submit, _scan_block, blocks(), 2 * pool.workers(config)), start + 1):
        bar.update(block.size)
        stats.merge(out['stats'])
        out['source'] = np.full(out['n'], block.source, np.uint16)
        out['blocks'] = np.array([out['n']], np.int64)
        for text in out['val_docs'][:1000 - len(val_docs)]:
          val_docs.append(text)
          files['val_docs'].write(_line(text))
        for h, i, text in out['sample']:
          if sample.add(h, n_docs + i, block.source, text):
            files['sample'].write(_line([h, n_docs + i, block.source, text]))
        for k, f in files.items():
          if k.startswith('band'):
            out['keys'][:, int(k[4:])].tofile(f)
          elif k not in ('sample', 'val_docs'):
            out[k].tofile(f)
        n_docs += out['n']
        if key and n_blocks % CHECKPOINT_BLOCKS == 0:
          _checkpoint(work_dir, files, dict(state, blocks=n_blocks, docs=n_docs,
                                            stats=stats.to_json()))
  finally:
    for f in files.values():
      f.close()
  if not n_docs:
    raise UserError(f'config.data.corpus={data.corpus!r}: no usable documents '
                    f'({stats.summary()})')
  path = lambda k: os.path.join(work_dir, f'{k}.bin')   # pylint: disable=unnecessary-lambda-assignment
  arrays = {k: np.fromfile(path(k), t) for k, t in _PER_DOC.items() if k != 'hash'}
  removed = (dedup.exact_removed(np.fromfile(path('hash'), np.uint64))
             if data.dedup != 'none' else np.zeros(n_docs, np.uint8))
  if near:
    dedup.near_removed([path(f'band{b}') for b in range(near[1])], path('sigs'), removed,
                       data.near_threshold)
  block_docs = np.fromfile(path('blocks'), np.int64).tolist()
  shutil.rmtree(work_dir, ignore_errors=True)
  chosen = sample.final(removed)
  return Scan(block_docs=block_docs, **arrays, removed=removed, stats=stats,
              sample=[t for *_, t in chosen], sample_sources=[s for _, _, s, _ in chosen],
              val_docs=val_docs)


def save(result: Scan, directory: str, key: str) -> None:
  """Writes what the second pass needs (block_docs, removed, counts) to `directory`."""
  files.sweep(os.path.dirname(os.path.abspath(directory)))
  tmp = files.temp_path(directory)
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  np.save(os.path.join(tmp, 'removed.npy'), result.removed)
  np.save(os.path.join(tmp, 'source.npy'), result.source)
  np.save(os.path.join(tmp, 'chars.npy'), result.chars)
  np.save(os.path.join(tmp, 'val.npy'), result.val)
  with open(os.path.join(tmp, 'scan.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(key=key, block_docs=result.block_docs), f)   # last: seals the scan
  files.replace_dir(tmp, directory)


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
