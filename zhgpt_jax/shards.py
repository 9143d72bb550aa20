"""Corpus -> tokenizer -> token shards on disk: the data-preparation stage.

`prepare` writes, under `data_dir(config, workdir)`:
  tokenizer/    tokenizer.json, tokenizer_config.json, special_tokens_map.json (loadable by
                transformers.AutoTokenizer) and prepare.json (the key it was built for);
  train/, val/  shard_00000.bin, ...: every document's token ids followed by <|endoftext|>,
                one flat little-endian uint16 stream (uint32 when the vocab exceeds 65536),
                at most `shard_tokens` tokens a file (a document may span two files), and
                meta.json: dtype, counts, the tokenizer hash, the source files and their
                skips, the split rule, and the input key.

Re-running with the same inputs reuses everything: the key hashes the corpus files' paths,
sizes and mtimes, the config.data/config.tokenizer fields that change the output, and
CODE_VERSION. A split is trusted only when its meta.json carries the current key and every
shard it lists has the right size; it is built in a temporary directory, meta.json last, and
renamed into place, so a killed run never leaves a split that a later run trusts.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from typing import Callable, Iterator

import numpy as np
from tokenizers import Tokenizer
import tqdm

from zhgpt_jax import corpus
from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import UserError

CODE_VERSION = 1   # bump when a change to corpus/tokenizer/shards changes what is written
SPLITS = ('train', 'val')
# Inputs that change the documents, so both the tokenizer and the shards.
_TEXT_FIELDS = ('corpus', 'text_field', 'txt_mode', 'fullwidth_to_halfwidth', 'val_fraction',
                'max_doc_chars')
_TOKENIZER_FIELDS = ('vocab_size', 'min_frequency', 'max_train_chars')
# A batch is what one worker tokenizes at a time: big enough that the hand-off is cheap,
# small enough that every worker gets one even on a small corpus.
_BATCH_CHARS = 1 << 18
_BATCH_DOCS = 4096


def data_dir(config, workdir: str) -> str:
  """Where the tokenizer and shards live: config.data.cache_dir, or <workdir>/data."""
  return config.data.cache_dir or os.path.join(workdir, 'data')


@dataclasses.dataclass
class PrepareSummary:
  """What `prepare` produced (or found). Counts are per split; str() is a multi-line report."""
  data_dir: str
  documents: dict[str, int]
  characters: dict[str, int]
  tokens: dict[str, int]              # <|endoftext|> separators included
  utf8_bytes: dict[str, int]          # UTF-8 bytes of the documents
  vocab_size: int
  chars_per_token: float              # on val (train when val is empty), separators excluded
  example: list[str]                  # an example sentence as its token pieces
  skipped: str
  seconds: float
  reused_tokenizer: bool
  reused_splits: tuple[str, ...]

  @property
  def reused(self) -> bool:
    return self.reused_tokenizer and set(self.reused_splits) == set(SPLITS)

  def __str__(self) -> str:
    what = ('reused tokenizer and shards' if self.reused else
            'built ' + ', '.join(
                ([] if self.reused_tokenizer else ['tokenizer']) +
                [s for s in SPLITS if s not in self.reused_splits]))
    lines = [f'data: {self.data_dir} ({what}, {self.seconds:.1f} s)']
    for s in SPLITS:
      lines.append(f'  {s + ":":6} {self.documents[s]:,} documents, {self.characters[s]:,} '
                   f'characters, {self.tokens[s]:,} tokens')
    on = 'val' if self.documents['val'] else 'train'
    lines.append(f'  tokenizer: vocab {self.vocab_size:,}, {self.chars_per_token:.2f} chars/token '
                 f'on {on}; {" | ".join(self.example)}')
    lines.append(f'  corpus: {self.skipped}')
    return '\n'.join(lines)


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _read_json(path: str) -> dict | None:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(obj, f, ensure_ascii=False, indent=2)
  os.replace(tmp, path)


def _n_heldout(config) -> int:
  return config.sft.heldout if 'sft' in config else corpus.HELDOUT_REVIEWS


def _text_inputs(config) -> dict:
  """Everything that decides the documents: the files as they are now and the text fields."""
  builtin = config.data.corpus == 'builtin'
  paths = (list(corpus.builtin_paths().values()) if builtin
           else corpus.resolve_paths(config.data.corpus))
  files = []
  for p in paths:
    st = os.stat(p)
    files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
  return dict(code=CODE_VERSION, files=files,
              data={k: config.data[k] for k in _TEXT_FIELDS},
              heldout=_n_heldout(config) if builtin else None)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
  # Two prepares into one directory would rename each other's splits away: take turns.
  with open(os.path.join(directory, '.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# ---- the tokenizer ----

# Peak memory of tokenizer training per character read, measured on Chinese (BENCHMARKS.md):
# the trainer keeps every distinct pre-token, and Chinese clauses rarely repeat.
_TRAIN_BYTES_PER_CHAR = 300


def _warn_if_training_may_not_fit(config, text_inputs: dict) -> None:
  """Prints a warning when training may need more than half of this machine's memory."""
  files = text_inputs['files']
  chars = config.tokenizer.max_train_chars
  if not any(f[0].endswith('.gz') for f in files):  # a character is at least one byte
    chars = min(chars, sum(f[1] for f in files))
  need = chars * _TRAIN_BYTES_PER_CHAR
  try:
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError):
    return
  if need > ram / 2:
    print(f'warning: training the tokenizer on up to {chars:,} characters may need '
          f'~{need / 2**30:.0f} GiB of memory (~{_TRAIN_BYTES_PER_CHAR} bytes a character on '
          f'Chinese) and this machine has {ram / 2**30:.0f} GiB: consider lowering '
          'config.tokenizer.max_train_chars', flush=True)


def _train(config, tok_dir: str, key: str, progress: bool) -> None:
  """Trains on the train split (at most max_train_chars) and saves to tok_dir, printing the
  vocab, chars/token on the val documents met while reading, and an example's pieces."""
  t0 = time.time()
  val_sample, n_train = [], [0]

  def train_docs():
    for doc, val in corpus.iter_labeled(config.data, corpus.CorpusStats(), _n_heldout(config)):
      if not val:
        n_train[0] += len(doc)
        yield doc
      elif len(val_sample) < 1000:
        val_sample.append(doc)

  t = config.tokenizer
  tok = tokenizer_lib.train_tokenizer(train_docs(), t.vocab_size, t.min_frequency,
                                      t.max_train_chars, progress)
  example = _example(config, val_sample)
  tokenizer_lib.save_tokenizer(tok, tok_dir, config.model.seq_len)
  plain = tokenizer_lib.as_plain_text(tok)
  n_tokens = sum(len(e.ids) for e in plain.encode_batch_fast(val_sample))
  cpt = (f'{sum(map(len, val_sample)) / n_tokens:.2f} chars/token on {len(val_sample)} val '
         'documents' if n_tokens else 'no val documents read')
  n_read = min(n_train[0], t.max_train_chars)
  print(f'tokenizer: vocab {tok.get_vocab_size():,} trained on {n_read:,} characters in '
        f'{time.time() - t0:.1f} s; {cpt}; '
        f'{" | ".join(tokenizer_lib.token_pieces(tok, example))}', flush=True)
  _write_json(os.path.join(tok_dir, 'prepare.json'),
              dict(key=key, hash=tokenizer_lib.tokenizer_hash(tok_dir), example=example))


def _example(config, val_docs: list[str]) -> str:
  if config.data.corpus == 'builtin' or not val_docs:
    return config.train.prompt
  return val_docs[0][:30]


def _tokenizer(config, tok_dir: str, text_inputs: dict, progress: bool) -> tuple[Tokenizer, bool]:
  """The tokenizer in tok_dir, trained or copied unless it is there for these inputs already.
  Returns (tokenizer, reused)."""
  t = config.tokenizer
  source = ({'path': tokenizer_lib.tokenizer_hash(t.path)} if t.path
            else {k: t[k] for k in _TOKENIZER_FIELDS})
  key = _hash(dict(text_inputs, tokenizer=source))
  done = _read_json(os.path.join(tok_dir, 'prepare.json')) or {}
  reused = (done.get('key') == key and os.path.isfile(os.path.join(tok_dir, 'tokenizer.json'))
            and done.get('hash') == tokenizer_lib.tokenizer_hash(tok_dir))
  if not reused:
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(tok_dir, 'prepare.json'))  # untrusted until rebuilt
    if t.path:
      tokenizer_lib.save_tokenizer(tokenizer_lib.load_tokenizer(t.path), tok_dir,
                                   config.model.seq_len)
      # The very bytes, so tokenizer_hash is the same for the copy and config.tokenizer.path.
      tmp = os.path.join(tok_dir, f'tokenizer.json.tmp-{os.getpid()}')
      shutil.copyfile(tokenizer_lib.json_path(t.path), tmp)
      os.replace(tmp, os.path.join(tok_dir, 'tokenizer.json'))
      _write_json(os.path.join(tok_dir, 'prepare.json'),
                  dict(key=key, hash=tokenizer_lib.tokenizer_hash(tok_dir),
                       example=config.train.prompt))
      print(f'tokenizer: copied from {t.path}', flush=True)
    else:
      _warn_if_training_may_not_fit(config, text_inputs)
      _train(config, tok_dir, key, progress)
  return tokenizer_lib.load_tokenizer(tok_dir), reused


# ---- the shards ----

_worker_tok: Tokenizer | None = None


def _init_worker(tok_json: str, serial_rust: bool) -> None:
  global _worker_tok
  if serial_rust:
    # One process per core already: a Rust thread pool per worker would only oversubscribe.
    os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  _worker_tok = tokenizer_lib.as_plain_text(Tokenizer.from_str(tok_json))


def _encode(docs: list[str], eot: int, dtype: str) -> tuple[np.ndarray, int]:
  """The token stream of `docs` (each followed by eot) and their UTF-8 byte count."""
  flat = []
  for enc in _worker_tok.encode_batch_fast(docs):
    flat.extend(enc.ids)
    flat.append(eot)
  return np.array(flat, dtype=dtype), sum(len(d.encode('utf-8')) for d in docs)


class _ShardWriter:
  """Appends token arrays to shard_00000.bin, ... in `directory`, shard_tokens per file."""

  def __init__(self, directory: str, dtype: np.dtype, shard_tokens: int):
    self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
    self.shards: list[dict] = []
    self.file = None
    self.documents = self.characters = self.utf8_bytes = 0
    os.makedirs(directory)

  def write(self, tokens: np.ndarray, documents: int, characters: int, n_bytes: int) -> None:
    self.documents += documents
    self.characters += characters
    self.utf8_bytes += n_bytes
    while tokens.size:
      if self.file is None or self.shards[-1]['tokens'] == self.shard_tokens:
        self._next()
      room = self.shard_tokens - self.shards[-1]['tokens']
      tokens[:room].astype(self.dtype, copy=False).tofile(self.file)
      self.shards[-1]['tokens'] += min(room, tokens.size)
      tokens = tokens[room:]

  def _next(self) -> None:
    if self.file is not None:
      self.file.close()
    name = f'shard_{len(self.shards):05d}.bin'
    self.file = open(os.path.join(self.directory, name), 'wb')
    self.shards.append(dict(name=name, tokens=0))

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


def _dtype(vocab_size: int) -> np.dtype:
  return np.dtype('<u2') if vocab_size <= 1 << 16 else np.dtype('<u4')


def _valid_meta(split_dir: str, key: str) -> dict | None:
  """The split's meta.json if it was written for `key` and its shards are whole, else None."""
  meta = _read_json(os.path.join(split_dir, 'meta.json'))
  if not meta or meta.get('key') != key:
    return None
  itemsize = np.dtype(meta['dtype']).itemsize
  for shard in meta['shards']:
    path = os.path.join(split_dir, shard['name'])
    if not os.path.isfile(path) or os.path.getsize(path) != shard['tokens'] * itemsize:
      return None
  return meta


def _batches(config, stats: corpus.CorpusStats, splits: tuple[str, ...]
            ) -> Iterator[tuple[str, list[str]]]:
  """(split, documents) batches of the corpus, for the splits asked for only."""
  pending = {s: [] for s in splits}
  size = dict.fromkeys(splits, 0)
  for doc, val in corpus.iter_labeled(config.data, stats, _n_heldout(config)):
    split = 'val' if val else 'train'
    if split not in pending:
      continue
    pending[split].append(doc)
    size[split] += len(doc)
    if size[split] >= _BATCH_CHARS or len(pending[split]) >= _BATCH_DOCS:
      yield split, pending[split]
      pending[split], size[split] = [], 0
  for split, docs in pending.items():
    if docs:
      yield split, docs


@contextlib.contextmanager
def _encoder(tok: Tokenizer, workers: int) -> Iterator[Callable]:
  """Yields submit(docs, eot, dtype) -> a callable that returns `_encode`'s result."""
  if workers == 1:
    # One process: a thread hands batches to the Rust encoder (which releases the GIL and uses
    # every core itself) while this thread reads and writes.
    _init_worker(tok.to_str(), serial_rust=False)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      yield lambda *args: pool.submit(_encode, *args).result
    return
  # spawn, not fork: the caller may have started JAX's threads, and a forked copy of a
  # multithreaded process can deadlock.
  with multiprocessing.get_context('spawn').Pool(workers, _init_worker,
                                                 (tok.to_str(), True)) as pool:
    yield lambda *args: pool.apply_async(_encode, args).get


def _tokenized(config, tok: Tokenizer, stats, splits, progress
              ) -> Iterator[tuple[str, list[str], np.ndarray, int]]:
  """(split, documents, tokens, utf-8 bytes) per batch, in corpus order, tokenized by
  `tokenize_workers` processes (1: in this process, on all cores)."""
  eot = tok.token_to_id(tokenizer_lib.EOT)
  dtype = _dtype(tok.get_vocab_size()).str
  if config.data.tokenize_workers < 0:
    raise UserError(f'config.data.tokenize_workers={config.data.tokenize_workers}: must be >= 0')
  workers = config.data.tokenize_workers or os.cpu_count() or 1
  in_flight = collections.deque()   # bounded, so memory does not grow with the corpus
  with tqdm.tqdm(unit='doc', unit_scale=True, disable=not progress, desc='shards') as bar, \
       _encoder(tok, workers) as submit:
    for split, docs in _batches(config, stats, splits):
      in_flight.append((split, docs, submit(docs, eot, dtype)))
      while len(in_flight) > 2 * workers:
        split, docs, result = in_flight.popleft()
        bar.update(len(docs))
        yield split, docs, *result()
    while in_flight:
      split, docs, result = in_flight.popleft()
      bar.update(len(docs))
      yield split, docs, *result()


def _build_shards(config, tok: Tokenizer, tok_hash: str, root: str, splits: tuple[str, ...],
                  key: str, progress: bool) -> dict[str, dict]:
  """Writes the shards and meta.json of `splits` under root; returns their metas."""
  dtype = _dtype(tok.get_vocab_size())
  stats = corpus.CorpusStats()
  tmp = {s: os.path.join(root, f'.tmp-{s}-{os.getpid()}') for s in splits}
  writers = {s: _ShardWriter(tmp[s], dtype, config.data.shard_tokens) for s in splits}
  try:
    for split, docs, tokens, n_bytes in _tokenized(config, tok, stats, splits, progress):
      writers[split].write(tokens, len(docs), sum(map(len, docs)), n_bytes)
  except BaseException:
    for w in writers.values():
      w.close()
      shutil.rmtree(w.directory, ignore_errors=True)
    raise
  for w in writers.values():
    w.close()
  metas = {}
  for split, w in writers.items():
    metas[split] = dict(
        format=1, split=split, dtype=dtype.name, byteorder='little',
        tokens=sum(s['tokens'] for s in w.shards), documents=w.documents,
        characters=w.characters, utf8_bytes=w.utf8_bytes, shards=w.shards,
        shard_tokens=config.data.shard_tokens, vocab_size=tok.get_vocab_size(),
        eot_id=tok.token_to_id(tokenizer_lib.EOT), tokenizer_hash=tok_hash,
        corpus=config.data.corpus, sources=stats.to_json(), skipped=stats.summary(),
        split_rule=dict(val_fraction=config.data.val_fraction, hash=corpus.HASH_METHOD,
                        builtin_val="People's Daily documents only; reviews are all train"),
        key=key, code_version=CODE_VERSION)
    _write_json(os.path.join(tmp[split], 'meta.json'), metas[split])  # last: seals the split
    final, old = os.path.join(root, split), os.path.join(root, f'.old-{split}-{os.getpid()}')
    if os.path.exists(final):
      os.rename(final, old)
    os.rename(tmp[split], final)
    shutil.rmtree(old, ignore_errors=True)
  return metas


def prepare(config, workdir: str, progress: bool = True) -> PrepareSummary:
  """Builds (or reuses) the tokenizer and the train/val shards for `config`.

  Returns a PrepareSummary (also printed). Raises UserError for a bad corpus or tokenizer path.
  """
  t0 = time.time()
  root = data_dir(config, workdir)
  os.makedirs(root, exist_ok=True)
  with _locked(root):
    for name in os.listdir(root):  # left by a killed run
      if name.startswith(('.tmp-', '.old-')):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    inputs = _text_inputs(config)
    tok_dir = os.path.join(root, 'tokenizer')
    tok, reused_tok = _tokenizer(config, tok_dir, inputs, progress)
    tok_hash = tokenizer_lib.tokenizer_hash(tok_dir)
    key = _hash(dict(inputs, shard_tokens=config.data.shard_tokens, tokenizer=tok_hash))
    metas = {s: _valid_meta(os.path.join(root, s), key) for s in SPLITS}
    reused = tuple(s for s in SPLITS if metas[s] is not None)
    stale = tuple(s for s in SPLITS if metas[s] is None)
    if stale:
      metas.update(_build_shards(config, tok, tok_hash, root, stale, key, progress))
  example = (_read_json(os.path.join(tok_dir, 'prepare.json')) or {}).get('example', '')
  cpt_split = 'val' if metas['val']['documents'] else 'train'
  m = metas[cpt_split]
  summary = PrepareSummary(
      data_dir=root,
      documents={s: metas[s]['documents'] for s in SPLITS},
      characters={s: metas[s]['characters'] for s in SPLITS},
      tokens={s: metas[s]['tokens'] for s in SPLITS},
      utf8_bytes={s: metas[s]['utf8_bytes'] for s in SPLITS},
      vocab_size=tok.get_vocab_size(),
      chars_per_token=m['characters'] / max(1, m['tokens'] - m['documents']),
      example=tokenizer_lib.token_pieces(tok, example),
      skipped=metas[stale[0] if stale else 'train']['skipped'],
      seconds=time.time() - t0, reused_tokenizer=reused_tok, reused_splits=reused)
  print(summary, flush=True)
  return summary


# pylint: disable-next=redefined-outer-name
def load_split(data_dir: str, split: str) -> tuple[np.ndarray, dict]:
  """Returns (tokens, meta) of a prepared split: the whole token stream as one array and the
  split's meta.json.

  One shard is returned as a read-only np.memmap (no copy); several are concatenated into
  memory. Raises UserError when the split is missing or a shard is not the size meta.json says.
  """
  split_dir = os.path.join(data_dir, split)
  meta = _read_json(os.path.join(split_dir, 'meta.json'))
  if meta is None:
    raise UserError(f'no prepared {split} split in {data_dir} (meta.json missing): run prepare')
  dtype = np.dtype(meta['dtype']).newbyteorder('<')
  arrays = []
  for shard in meta['shards']:
    path = os.path.join(split_dir, shard['name'])
    if not os.path.isfile(path) or os.path.getsize(path) != shard['tokens'] * dtype.itemsize:
      raise UserError(f'{path} is missing or not {shard["tokens"]} tokens: run prepare again')
    arrays.append(np.memmap(path, dtype=dtype, mode='r'))
  if not arrays:
    return np.zeros(0, dtype), meta
  return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)), meta
