"""Data files as they are downloaded: which files an entry names, and the records in them.

Formats, by extension (and, for .json, by content):
  * `.txt`: text lines (the caller reads them as documents or paragraphs);
  * `.jsonl` / `.json`: JSON lines, or for `.json` one JSON array of records, told apart by
    the first byte (`[`). A `.json` holding one object (`{"data": [...]}`, or a record
    spread over lines) is an error that says so, not a one-record corpus;
  * each of these optionally compressed: `.gz` (gzip) or `.zst` / `.zstd` (zstandard);
  * `.parquet` (pyarrow): the columns the caller names, a record batch at a time.

Entries (`resolve_paths`, `entry_paths`): a file, a directory (searched recursively), a glob,
or `hf:OWNER/NAME[/SUBDIR]`, a Hugging Face *dataset* id fetched (or found in the local hub
cache) with `huggingface_hub.snapshot_download` (`init_from=hf:DIR` is a different thing: a
local *model* directory). In a directory or a snapshot, a file belongs to a split by the
hub's naming rule: a word of its relative path (split at `-._ /` and digits) is `train` /
`training`, `validation` / `valid` / `val` / `dev`, or `test` / `testing` / `eval` /
`evaluation` (`data/train-00000-of-00009.parquet`, `c4-validation.00001-of-00008.json.gz`,
`train/part.jsonl`); `data.split` picks one. A directory none of whose files is named for a
split is all `train`, as on the hub. Files and globs named explicitly are never filtered.

Parallel reading (`file_parts` in the main process, `part_items` in a pool worker): a file
becomes Parts of about `block_bytes` of input each:
  * text and JSON lines: whole lines, decompressed as a stream in the main process (gzip, or
    zstandard's decompressor frame by frame: one core decompresses ~1 GB/s, so the workers
    that parse the lines are the bottleneck, not it). A .zst file is not split for parallel
    decompression: the zstd tool writes one frame with no seek table, so there is no point
    to start at but the beginning;
  * a JSON array: elements decoded in the main process (`json.JSONDecoder.raw_decode` over a
    sliding window: one element in memory at a time, never the whole file), sent as records;
  * parquet: record batches of the named columns only, of about `block_bytes` of decoded
    data each (`ParquetFile.iter_batches`, the column chunks read 1 MiB at a time): decoded
    (decompressed, C++) in the main process, turned into Python records in the workers (plain
    string columns sent as their Arrow buffers, so those workers never import pyarrow).
    Not a row group a Part: writers make row groups of anything from 100 rows to 1 GB, and
    a Part must stay small for memory to stay flat and every core busy.
A damaged file (a truncated .gz/.zst/.parquet, broken JSON inside an array) is a UserError
naming it; a bad line of JSON lines is a `Bad` item the caller counts and skips.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import gzip
import itertools
import json
import os
import re
from typing import Callable, Iterable, Iterator

from zhgpt_jax.config import UserError

COMPRESSIONS = ('', '.gz', '.zst', '.zstd')
JSON_SUFFIXES = tuple(s + c for s in ('.jsonl', '.json') for c in COMPRESSIONS)
CORPUS_SUFFIXES = (*JSON_SUFFIXES, '.parquet', *('.txt' + c for c in COMPRESSIONS))
CHAT_SUFFIXES = (*JSON_SUFFIXES, '.parquet')
SPLIT_WORDS = {'train': ('train', 'training'), 'validation': ('validation', 'valid', 'val', 'dev'),
               'test': ('test', 'testing', 'eval', 'evaluation')}
_WORDS = re.compile(r'[-._ /0-9]+')
_READ = 1 << 18   # compressed bytes read at a time


@dataclasses.dataclass
class Part:
  """A piece of one file that a worker turns into items: `kind` 'lines' (payload: bytes of
  whole lines), 'records' (a list of decoded JSON values) or 'parquet' (a pyarrow
  RecordBatch of the columns read, or plain string columns' buffers, `string_rows`).
  `size`: the file bytes it stands for (progress)."""
  path: str
  kind: str
  payload: object
  size: int


class Bad:
  """An item that is no record: `reason` 'invalid_utf8', 'malformed' or 'blank'."""
  __slots__ = ('reason',)

  def __init__(self, reason: str):
    self.reason = reason


def strip_compression(path: str) -> str:
  """`path` without a trailing .gz/.zst/.zstd."""
  for c in COMPRESSIONS[1:]:
    if path.endswith(c):
      return path[:-len(c)]
  return path


def kind_of(path: str) -> str:
  """'parquet', 'txt' or 'json' (JSON lines or a JSON array)."""
  base = strip_compression(path)
  return 'parquet' if base.endswith('.parquet') else 'txt' if base.endswith('.txt') else 'json'


# ----------------------------------------------------------------------------- which files

def split_of(relpath: str) -> str | None:
  """The split a file's path names by the hub's rule ('train', 'validation', 'test'), or None."""
  words = set(_WORDS.split(relpath.lower()))
  for split, names in SPLIT_WORDS.items():
    if words.intersection(names):
      return split
  return None


def _in_split(root: str, files: list[str], split: str, entry: str, key: str) -> list[str]:
  named = {f: split_of(os.path.relpath(f, root)) for f in files}
  if not any(named.values()):   # nothing named for a split: all train, as on the hub
    found = files if split == 'train' else []
  else:
    found = [f for f in files if named[f] == split]
  if not found:
    have = sorted({s or 'train' for s in named.values()})
    raise UserError(f'{key}: {entry} has no files of split {split!r} (config.data.split); '
                    f'it has {", ".join(have)}')
  return found


@functools.lru_cache(maxsize=64)
def hub_snapshot(entry: str, key: str) -> str:
  """The local directory of `hf:OWNER/NAME[/SUBDIR]` (a Hugging Face dataset): the hub cache's
  snapshot (downloaded first when not there and the network allows), then SUBDIR in it."""
  parts = entry[3:].strip('/').split('/')
  if len(parts) < 2 or not all(parts):
    raise UserError(f"{key}: {entry} is not a dataset id: use hf:OWNER/NAME or "
                    'hf:OWNER/NAME/SUBDIR (a local directory is given as its path)')
  repo, sub = '/'.join(parts[:2]), '/'.join(parts[2:])
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    root = huggingface_hub.snapshot_download(
        repo, repo_type='dataset', allow_patterns=[f'{sub}/**'] if sub else None)
  except Exception as e:  # pylint: disable=broad-except  (offline, unknown repo, auth, ...)
    raise UserError(f'{key}: cannot get dataset {repo} from the Hugging Face hub or its cache '
                    f'({type(e).__name__}: {" ".join(str(e).split())[:300]})') from None
  path = os.path.join(root, sub)
  if not os.path.isdir(path):
    raise UserError(f'{key}: dataset {repo} has no folder {sub!r}')
  return path


def entry_paths(entry: str, key: str, suffixes: tuple[str, ...], split: str = 'train'
                ) -> list[str]:
  """The files (ending in `suffixes`, sorted) that one entry names; UserError if none."""
  bases = dict.fromkeys(strip_compression(s) for s in suffixes)
  kinds = '/'.join(bases) + (' (.gz/.zst too)' if len(suffixes) > len(bases) else '')
  if entry.startswith('hf:') and not os.path.exists(entry):
    entry = hub_snapshot(entry, key)
  if os.path.isdir(entry):
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(entry) for f in fs
                   if f.endswith(suffixes))
    if not found:
      raise UserError(f'{key}: directory {entry} has no {kinds} files')
    found = _in_split(entry, found, split, entry, key)
  elif os.path.isfile(entry) and not entry.endswith(suffixes):
    raise UserError(f'{key}: {entry} is not a {kinds.replace(" (", " file (", 1)} file'
                    .replace(') file', ')'))
  elif os.path.isfile(entry):
    found = [entry]
  elif not glob.has_magic(entry):
    raise UserError(f'{key}: {entry} does not exist')
  elif not (found := sorted(p for p in glob.glob(entry, recursive=True)
                            if os.path.isfile(p) and p.endswith(suffixes))):
    raise UserError(f'{key}: glob {entry} matches no {kinds} files')
  return found


def resolve_paths(spec: str, key: str = 'config.data.corpus',
                  suffixes: tuple[str, ...] = CORPUS_SUFFIXES, split: str = 'train') -> list[str]:
  """Expands a comma-separated list of entries into sorted file paths ending in `suffixes`;
  UserError names the entry (`key`: the config field) that finds none."""
  paths = []
  for entry in (e.strip() for e in spec.split(',')):
    if entry:
      paths.extend(p for p in entry_paths(entry, key, suffixes, split) if p not in paths)
  if not paths:
    raise UserError(f'{key}={spec!r} names no files')
  return paths


# ----------------------------------------------------------------------------- bytes

def _zstd_chunks(f) -> Iterator[bytes]:
  import zstandard  # pylint: disable=import-outside-toplevel
  dctx = zstandard.ZstdDecompressor()
  d, fed = dctx.decompressobj(), False
  while data := f.read(_READ):
    while data:
      out = d.decompress(data)
      fed = True
      if out:
        yield out
      data = b''
      if d.eof:   # a frame ended: the next one (if any) starts in unused_data
        data, d, fed = d.unused_data, dctx.decompressobj(), False
  if fed and not d.eof:
    raise EOFError('truncated zstd data (the last frame is not complete)')


def chunks(path: str, size: int = 1 << 20) -> Iterator[tuple[bytes, int]]:
  """(decompressed bytes, file bytes read so far) of `path` in pieces; UserError if the file
  is unreadable or damaged."""
  try:
    with open(path, 'rb') as raw:
      if path.endswith('.gz'):
        with gzip.GzipFile(fileobj=raw) as f:
          while data := f.read(size):
            yield data, raw.tell()
      elif path.endswith(('.zst', '.zstd')):
        buf = bytearray()   # frames and reads decompress to any size: pieces of `size`
        for data in _zstd_chunks(raw):
          buf += data
          while len(buf) >= size:
            yield bytes(buf[:size]), raw.tell()
            del buf[:size]
        if buf:
          yield bytes(buf), raw.tell()
      else:
        while data := raw.read(size):
          yield data, raw.tell()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (OSError, EOFError, ZstdError, ...)
    raise UserError(f'cannot read {path}: {e}') from None


def raw_lines(path: str) -> Iterator[bytes]:
  """The lines of a file (decompressed) as bytes, each with its b'\\n'."""
  for data, _ in line_blocks(path, False, 1 << 20):
    yield from block_lines(data)


def _cut_point(data: bytes, paragraph: bool) -> int:
  """Where `data` may be cut so that a line (a paragraph) is never split: <= 0 if nowhere."""
  if not paragraph:
    return data.rfind(b'\n') + 1
  ends = [i + len(sep) for sep in (b'\n\n', b'\n\r\n') if (i := data.rfind(sep)) >= 0]
  return max(ends, default=0)


def line_blocks(path: str, paragraph: bool, block_bytes: int) -> Iterator[tuple[bytes, int]]:
  """(whole lines or paragraphs of about block_bytes, file bytes they stand for) of one file."""
  carry, done = b'', 0
  for chunk, now in chunks(path, block_bytes):
    data = carry + chunk
    cut = _cut_point(data, paragraph)
    if cut <= 0:
      carry = data
      continue
    yield data[:cut], now - done
    carry, done = data[cut:], now
  if carry:
    yield carry, os.path.getsize(path) - done


def block_lines(data: bytes) -> list[bytes]:
  """`data` split after each b'\\n' (which stays, as when a file is iterated)."""
  lines = [line + b'\n' for line in data.split(b'\n')]
  last = lines.pop()
  if last != b'\n':
    lines.append(last[:-1])
  return lines


# ----------------------------------------------------------------------------- JSON

def json_shape(path: str) -> str:
  """'array' or 'lines' for a JSON file; UserError for a .json holding one object."""
  head = b''
  for data, _ in chunks(path, 1 << 16):
    head += data
    start = head.lstrip(b'\xef\xbb\xbf \t\r\n')
    if start[:1] == b'[':
      return 'array'
    if start and (not strip_compression(path).endswith('.json') or start[:1] != b'{'):
      return 'lines'   # .jsonl, or not an object: JSON lines (bad lines are counted)
    if b'\n' in start or len(head) > 1 << 26:
      break
  start = head.lstrip(b'\xef\xbb\xbf \t\r\n')
  if not start:
    return 'lines'
  first, _, rest = start.partition(b'\n')
  try:
    record = json.loads(first)
  except ValueError:   # a bad first line is counted; one object over many lines is an error
    if first.rstrip().endswith(b'}'):
      return 'lines'
    record = None
  if record is not None and (not isinstance(record, dict) or rest.strip() or any(
      d.strip() for d, _ in _after(path, len(head)))):
    return 'lines'
  keys = ', '.join(list(record)[:8]) if isinstance(record, dict) else None
  raise UserError(f'{path} holds one JSON object' + (f' (keys: {keys})' if keys else '') +
                  ', not records: a .json must be a JSON array of records or JSON lines '
                  '(one record a line)')


def _after(path: str, n: int) -> Iterator[tuple[bytes, int]]:
  seen = 0
  for data, pos in chunks(path, 1 << 16):
    if seen + len(data) > n:
      yield data[max(0, n - seen):], pos
    seen += len(data)


def array_blocks(path: str, block_bytes: int) -> Iterator[tuple[list, int]]:
  """(records, file bytes they stand for) of a file holding one JSON array, about block_bytes
  characters of JSON a list; UserError where the file is not one valid JSON array."""
  decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder('utf-8')()
  buf, state, seen = '', 'start', 0     # state: start -> first/item -> after -> ... -> end
  batch, chars, done, now = [], 0, 0, 0

  def fail(what: str, pos: int):
    raise UserError(f'{path}: the JSON array {what} near character {seen + pos:,}; '
                    'is the file complete and valid JSON?')

  for data, now in itertools.chain(chunks(path), [(None, None)]):
    final = data is None
    try:
      buf += utf8.decode(b'' if final else data, final)
    except UnicodeDecodeError:
      fail('is not valid UTF-8', len(buf))
    now = os.path.getsize(path) if final else now
    pos = 0
    while (pos := _skip_ws(buf, pos)) < len(buf):
      c = buf[pos]
      if state == 'start':
        if c != '[' and c != '\ufeff':
          fail('does not start with [', pos)
        state = 'start' if c == '\ufeff' else 'first'
        pos += 1
      elif state == 'end':
        fail('has more after its closing ]', pos)
      elif c == ']' and state in ('first', 'after'):
        state, pos = 'end', pos + 1
      elif state == 'after':
        if c != ',':
          fail('lacks a comma between records', pos)
        state, pos = 'item', pos + 1
      else:
        try:
          value, end = decoder.raw_decode(buf, pos)
        except ValueError:
          if final or len(buf) - pos > 1 << 27:
            fail('is not valid JSON', pos)
          break   # the value goes on in the next chunk
        if end == len(buf) and not final:
          break   # a number at the end may go on in the next chunk
        batch.append(value)
        chars += end - pos
        state, pos = 'after', end
        if chars >= block_bytes:
          yield batch, now - done
          batch, chars, done = [], 0, now
    seen += pos
    buf = buf[pos:]
  if state != 'end':
    fail('ends before its closing ]', len(buf))
  if batch:
    yield batch, now - done


def _skip_ws(text: str, pos: int) -> int:
  while pos < len(text) and text[pos] in ' \t\r\n':
    pos += 1
  return pos


def json_lines(lines: Iterable[bytes]) -> Iterator:
  """The records of JSON lines, a `Bad` for each line that is not one."""
  loads = json.loads
  for raw in lines:
    try:
      line = raw.decode('utf-8')
    except UnicodeDecodeError:
      yield Bad('invalid_utf8')
      continue
    if not line.strip():
      yield Bad('blank')
      continue
    try:
      yield loads(line.lstrip('\ufeff'))
    except (ValueError, RecursionError):
      yield Bad('malformed')


# ----------------------------------------------------------------------------- parquet

def parquet_file(path: str):
  """pyarrow's ParquetFile of `path`, reading a column chunk 1 MiB at a time (not whole);
  UserError if it is not a (complete) parquet file."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    return pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
  except Exception as e:  # pylint: disable=broad-except  (ArrowInvalid, OSError)
    raise UserError(f'cannot read {path}: {" ".join(str(e).split())} (a truncated or damaged '
                    'parquet file?)') from None


def parquet_blocks(path: str, columns: list[str], block_bytes: int) -> Iterator[tuple[object, int]]:
  """(a pyarrow RecordBatch of `columns`, file bytes it stands for) of about block_bytes of
  decoded column data each, in row order. The rows a batch holds follow from the footer
  alone (the columns' uncompressed size a row), so the batches are the same on every run."""
  pf = parquet_file(path)
  meta = pf.metadata
  if not meta.num_rows:
    return
  data = sum(rg.column(j).total_uncompressed_size
             for rg in map(meta.row_group, range(meta.num_row_groups))
             for j in range(rg.num_columns)
             if any(rg.column(j).path_in_schema == c or
                    rg.column(j).path_in_schema.startswith(c + '.') for c in columns))
  rows = max(1, int(block_bytes * meta.num_rows / max(1, data)))
  size, done, seen = os.path.getsize(path), 0, 0
  try:
    for batch in pf.iter_batches(batch_size=rows, columns=columns, use_threads=False):
      seen += batch.num_rows
      now = size * seen // meta.num_rows
      yield _plain_strings(batch) or batch, now - done
      done = now
  except Exception as e:  # pylint: disable=broad-except  (a damaged page or column chunk)
    raise UserError(f'cannot read {path} (after row {seen:,}): {" ".join(str(e).split())}'
                    ) from None


def _plain_strings(batch) -> tuple | None:
  """A batch whose columns are all plain strings as (name, validity, offsets, data, wide)
  byte buffers a column, which a worker reads without pyarrow (`string_rows`): pyarrow
  costs ~35 MB of memory in each process that imports it. None for other batches."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  out = []
  for name, arr in zip(batch.schema.names, batch.columns):
    wide = pa.types.is_large_string(arr.type)
    if not (wide or pa.types.is_string(arr.type)) or arr.offset:
      return None
    valid, offsets, data = arr.buffers()
    out.append((name, len(arr), valid.to_pybytes() if arr.null_count else None,
                offsets.to_pybytes(), data.to_pybytes() if data is not None else b'', wide))
  return tuple(out)


def string_rows(columns: tuple) -> Iterator:
  """The rows (dicts) of `_plain_strings` buffers; a `Bad` for a cell that is not UTF-8."""
  values = []
  for _, n, valid, offsets, data, wide in columns:
    off = memoryview(offsets).cast('q' if wide else 'i')
    cells = []
    for i in range(n):
      if valid is not None and not valid[i >> 3] >> (i & 7) & 1:
        cells.append(None)
        continue
      try:
        cells.append(data[off[i]:off[i + 1]].decode('utf-8'))
      except UnicodeDecodeError:
        cells.append(Bad('invalid_utf8'))
    values.append(cells)
  names = [c[0] for c in columns]
  for row in zip(*values):
    bad = next((v for v in row if isinstance(v, Bad)), None)
    yield bad if bad is not None else dict(zip(names, row))


# ----------------------------------------------------------------------------- parts

def file_parts(path: str, columns: Callable, paragraph: bool = False,
               block_bytes: int = 1 << 20) -> Iterator[Part]:
  """The Parts of one file in order (see the module docstring); `columns(path, names)` picks
  a parquet file's columns (UserError when it lacks them)."""
  kind = kind_of(path)
  if kind == 'parquet':
    names = parquet_file(path).schema_arrow.names
    cols = columns(path, names)
    for payload, size in parquet_blocks(path, cols, block_bytes):
      yield Part(path, 'parquet', payload, size)
  elif kind == 'json' and json_shape(path) == 'array':
    for records, size in array_blocks(path, block_bytes):
      yield Part(path, 'records', records, size)
  else:
    for data, size in line_blocks(path, paragraph, block_bytes):
      yield Part(path, 'lines', data, size)


def part_items(part: Part) -> Iterator:
  """The records of a Part (JSON values, parquet rows as dicts), a `Bad` for each line of
  JSON lines that is not one. (A 'lines' Part of a .txt file is read by the caller.)"""
  if part.kind == 'lines':
    return json_lines(block_lines(part.payload))
  if part.kind == 'records':
    return iter(part.payload)
  if isinstance(part.payload, tuple):
    return string_rows(part.payload)
  return iter(part.payload.to_pylist())
