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

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Iterator

import numpy as np
from tokenizers import Tokenizer

from zhgpt_jax import files
from zhgpt_jax import builtin_corpus, corpus, documents, encode, scan
from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import UserError, check_paths, disk_errors

CODE_VERSION = 4   # bump when a change to corpus/tokenizer/shards changes what is written
SPLITS = ('train', 'val')
# Inputs that change the documents, so both the tokenizer and the shards.
_TEXT_FIELDS = ('text_field', 'txt_mode', 'fullwidth_to_halfwidth', 'val_fraction',
                'max_doc_chars', 'dedup', 'near_threshold', 'near_ngram')
_TOKENIZER_FIELDS = ('vocab_size', 'min_frequency', 'max_train_chars')


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
  groups: list[dict]                  # per source of the train split (meta's source_groups)
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
    if len(self.groups) > 1 or any(g.get('exact_duplicates') or g.get('near_duplicates')
                                   for g in self.groups):
      for g in self.groups:
        lines.append(f'  source {g["name"]}: {g["documents"]:,} train documents, '
                     f'{g["tokens"]:,} tokens; duplicates removed: '
                     f'{g.get("exact_duplicates", 0):,} exact, {g.get("near_duplicates", 0):,} near')
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


def _n_heldout(config) -> int:
  return config.sft.heldout if 'sft' in config else builtin_corpus.HELDOUT_REVIEWS


def _exclude(config) -> frozenset[str]:
  """What pretraining leaves out: the builtin reviews SFT holds out (none of a user corpus)."""
  if config.data.corpus != 'builtin':
    return frozenset()
  return builtin_corpus.heldout(_n_heldout(config))


def _text_inputs(config) -> dict:
  """Everything that decides the documents: the files as they are now and the text fields."""
  builtin = config.data.corpus == 'builtin'
  paths = [p for s in documents.sources(config.data.corpus, split=config.data.split) for p in s.paths]
  files = []
  for p in paths:
    st = os.stat(p)
    files.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
  return dict(code=CODE_VERSION, files=files,
              data=dict({k: config.data[k] for k in _TEXT_FIELDS},
                        corpus=documents.without_weights(config.data.corpus, config.data.split)),
              heldout=_n_heldout(config) if builtin else None)


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
  # Two prepares into one directory would rename each other's splits away: take turns.
  try:
    f = open(os.path.join(directory, '.lock'), 'w')
  except OSError as e:
    if e.errno != errno.EROFS:
      raise
    yield   # a read-only cache: no one writes there; what it holds can still be used
    return
  with f:
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


def _train(config, tok_dir: str, key: str, found: scan.Scan, source_names: list[str],
           progress: bool) -> None:
  """Trains on the scan's sample and saves to tok_dir, printing each source's share of the
  sample and of the corpus, the vocab, chars/token on val documents and an example."""
  t0 = time.time()
  t = config.tokenizer
  sample, val_docs = found.sample, found.val_docs
  print(sample_shares(found, source_names, t.max_train_chars), flush=True)
  if not sum(map(len, sample)):
    raise _empty_train(config, int(np.sum(found.val)))
  tok = tokenizer_lib.train_tokenizer(sample, t.vocab_size, t.min_frequency,
                                      t.max_train_chars, progress)
  example = _example(config, val_docs)
  tokenizer_lib.save_tokenizer(tok, tok_dir, config.model.seq_len)
  plain = tokenizer_lib.as_plain_text(tok)
  n_tokens = sum(len(e.ids) for e in plain.encode_batch_fast(val_docs))
  cpt = (f'{sum(map(len, val_docs)) / n_tokens:.2f} chars/token on {len(val_docs)} val '
         'documents' if n_tokens else 'no val documents read')
  print(f'tokenizer: vocab {tok.get_vocab_size():,} trained on {sum(map(len, sample)):,} '
        f'characters in {time.time() - t0:.1f} s; {cpt}; '
        f'{" | ".join(tokenizer_lib.token_pieces(tok, example))}', flush=True)
  files.write_json(os.path.join(tok_dir, 'prepare.json'),
              dict(key=key, hash=tokenizer_lib.tokenizer_hash(tok_dir), example=example))


def sample_shares(found: scan.Scan, names: list[str], max_chars: int) -> str:
  """One line: the sample's size and rate, and each source's share of it and of the corpus."""
  kept = (found.removed == 0) & ~found.val
  corpus_chars = np.bincount(found.source[kept], found.chars[kept], len(names))
  sample_chars = np.bincount(np.asarray(found.sample_sources, np.int64),
                             np.fromiter(map(len, found.sample), np.float64, len(found.sample)),
                             len(names))
  total, n = corpus_chars.sum(), sample_chars.sum()
  shares = ', '.join(f'{name} {s / max(n, 1):.1%} (corpus {c / max(total, 1):.1%})'
                     for name, s, c in zip(names, sample_chars, corpus_chars))
  return (f'tokenizer sample: {int(n):,} of {int(total):,} train characters '
          f'({n / max(total, 1):.1%}, max_train_chars={max_chars:,}): {shares}')


def _warn_if_mostly_invalid(path: str, invalid: int, good: int) -> None:
  """Prints a warning when most of a file's lines are not UTF-8 (a UTF-16 or GBK file)."""
  if invalid > good:
    print(f'warning: {path}: {invalid:,} of its {invalid + good:,} documents are not valid '
          'UTF-8; this file looks mostly invalid -- is it UTF-8? (convert UTF-16 or GBK files '
          'first)', flush=True)


def _empty_train(config, n_val: int) -> UserError:
  return UserError(f'config.data.corpus={config.data.corpus!r}: the train split is empty (all '
                   f'{n_val:,} documents or pieces fell into val at data.val_fraction='
                   f'{config.data.val_fraction}), so the tokenizer would train on 0 characters; '
                   'lower data.val_fraction or add documents')


def _example(config, val_docs: list[str]) -> str:
  if config.data.corpus == 'builtin' or not val_docs:
    return config.train.prompt
  return val_docs[0][:30]


def _tokenizer(config, tok_dir: str, text_inputs: dict, sampled: Callable[[], scan.Scan],
               names: list[str], progress: bool) -> tuple[Tokenizer, bool]:
  """The tokenizer in tok_dir, trained (on `sampled()`'s sample) or copied unless it is there
  for these inputs already. Returns (tokenizer, reused)."""
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
      # The very files, so tokenizer_hash is the same for the copy and config.tokenizer.path.
      tokenizer_lib.copy_tokenizer(t.path, tok_dir)
      files.write_json(os.path.join(tok_dir, 'prepare.json'),
                  dict(key=key, hash=tokenizer_lib.tokenizer_hash(tok_dir),
                       example=config.train.prompt))
      print(f'tokenizer: copied from {t.path}', flush=True)
    else:
      _warn_if_training_may_not_fit(config, text_inputs)
      _train(config, tok_dir, key, sampled(), names, progress)
  return tokenizer_lib.load_tokenizer(tok_dir), reused


# ---- the shards ----

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


def _seal(config, tok: Tokenizer, tok_hash: str, root: str, build_dir: str, key: str,
          states: dict, stats: corpus.CorpusStats, counts: list[dict] | None) -> dict[str, dict]:
  """Writes each split's meta.json and renames the built splits into place; returns metas."""
  names = [src.name for src in documents.sources(config.data.corpus, split=config.data.split)]
  counts = counts or [{} for _ in names]
  metas = {}
  for split, st in states.items():
    groups = [dict(name=n, files=list(src.paths), tokens=t, documents=d, **c)
              for n, src, t, d, c in zip(names, documents.sources(config.data.corpus, split=config.data.split),
                                         st['source_tokens'], st['source_documents'], counts)]
    metas[split] = dict(
        format=2, split=split, dtype=_dtype(tok.get_vocab_size()).name, byteorder='little',
        tokens=sum(s['tokens'] for s in st['shards']), documents=st['documents'],
        characters=st['characters'], utf8_bytes=st['utf8_bytes'], shards=st['shards'],
        shard_tokens=config.data.shard_tokens, vocab_size=tok.get_vocab_size(),
        eot_id=tokenizer_lib.special_ids(tok).eos, tokenizer_hash=tok_hash,
        corpus=documents.without_weights(config.data.corpus, config.data.split), source_groups=groups,
        dedup=dict(mode=config.data.dedup, near_threshold=config.data.near_threshold,
                   near_ngram=config.data.near_ngram),
        sources=stats.to_json(), skipped=stats.summary(),
        split_rule=dict(val_fraction=config.data.val_fraction, hash=corpus.HASH_METHOD,
                        builtin_val="People's Daily documents only; reviews are all train"),
        key=key, code_version=CODE_VERSION)
    files.write_json(os.path.join(build_dir, split, 'meta.json'), metas[split])  # seals the split
  for split in states:
    files.replace_dir(os.path.join(build_dir, split), os.path.join(root, split))
  shutil.rmtree(build_dir, ignore_errors=True)
  return metas


def _prepare(config, root: str, progress: bool):
  """prepare's work in `root`: (metas, tokenizer dir, tokenizer, reused it, reused splits)."""
  os.makedirs(root, exist_ok=True)
  with _locked(root):
    files.sweep(root, all_ours=True)   # what a killed run left (we hold the lock) ...
    for name in os.listdir(root):      # ... and what earlier versions' killed runs left
      if name.startswith(('.tmp-', '.old-')):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    inputs = _text_inputs(config)
    names = [src.name for src in documents.sources(config.data.corpus, split=config.data.split)]
    scan_dir, scan_key = os.path.join(root, 'scan'), _hash(inputs)
    exclude = _exclude(config)   # the held-out reviews, resolved once for both passes
    found = None

    def scanned(want_sample: bool) -> scan.Scan:
      nonlocal found
      if found is None and not want_sample:
        found = scan.load(scan_dir, scan_key)
      if found is None or (want_sample and not found.sample):
        t_scan = time.time()
        found = scan.scan(config, exclude, want_sample, progress,
                          os.path.join(root, '.scan-build'), key=scan_key)
        scan.save(found, scan_dir, scan_key)
        codes = np.bincount(found.removed, minlength=3)
        print(f'scan: {len(found.removed):,} documents in {time.time() - t_scan:.1f} s; '
              f'dedup={config.data.dedup} removed {codes[1]:,} exact and {codes[2]:,} near '
              'duplicates', flush=True)
      return found

    tok_dir = os.path.join(root, 'tokenizer')
    tok, reused_tok = _tokenizer(config, tok_dir, inputs, lambda: scanned(True), names, progress)
    tok_hash = tokenizer_lib.tokenizer_hash(tok_dir)
    key = _hash(dict(inputs, shard_tokens=config.data.shard_tokens, tokenizer=tok_hash))
    metas = {s: _valid_meta(os.path.join(root, s), key) for s in SPLITS}
    reused = tuple(s for s in SPLITS if metas[s] is not None)
    if len(reused) < len(SPLITS):
      reused = ()
      if config.data.dedup != 'none':
        scanned(False)
      counts = found.summary_counts(len(names)) if found else None
      if found:  # the second pass needs only removed and block_docs
        found = dataclasses.replace(found, source=None, chars=None, val=None, sample=[],
                                    val_docs=[])
      build_dir = os.path.join(root, '.build')
      states, stats = encode.build(config, tok, exclude, build_dir, key, found,
                                   len(names), progress)
      for path, f in stats.files.items():
        _warn_if_mostly_invalid(path, f.skipped['invalid_utf8'], f.documents)
      metas = _seal(config, tok, tok_hash, root, build_dir, key, states, stats, counts)
  return metas, tok_dir, tok, reused_tok, reused


def prepare(config, workdir: str, progress: bool = True) -> PrepareSummary:
  """Builds (or reuses) the tokenizer and the train/val shards for `config`.

  `config` is validated by the caller (main.py, train.build). Returns a PrepareSummary (also
  printed). Raises UserError for a bad corpus or tokenizer path.
  """
  t0 = time.time()
  check_paths(config, workdir, training=False)
  root = data_dir(config, workdir)
  with disk_errors('prepare', f'prepare stopped. What was finished in {root} is kept and '
                   'nothing half-written is used; free the space or fix the permission (or set '
                   'config.data.cache_dir to a writable directory) and run the same command to '
                   'continue', root):
    metas, tok_dir, tok, reused_tok, reused = _prepare(config, root, progress)
  if not metas['train']['documents']:
    raise _empty_train(config, metas['val']['documents'])
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
      skipped=metas['train']['skipped'], groups=metas['train'].get('source_groups', []),
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


def digest(data_dir: str) -> str:
  """sha256 over every train and val shard of `data_dir` (names and bytes, in name order;
  meta.json, which names the input files, is not a shard): two prepares that wrote the same
  shards have the same digest, whatever files they read."""
  h = hashlib.sha256()
  for split in ('train', 'val'):
    for name in sorted(os.listdir(os.path.join(data_dir, split))):
      if name.startswith('shard_'):
        with open(os.path.join(data_dir, split, name), 'rb') as f:
          h.update(name.encode() + f.read())
  return h.hexdigest()
