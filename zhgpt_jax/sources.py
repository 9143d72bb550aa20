"""The corpus as blocks for parallel workers: the reading half of `prepare`'s pipeline.

`iter_blocks` (in the main process) cuts every file of every source into blocks of whole
lines (whole paragraphs in txt paragraph mode) of about 1 MiB, in corpus order, reading
.gz files through gzip; `block_documents` (in a worker) decodes, parses, normalises, splits
and cuts a block exactly as `corpus.iter_labeled` reads the same lines, so the documents,
their order and every skip count are the same whichever way the corpus is read.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
from typing import Iterable, Iterator

from zhgpt_jax import corpus
from zhgpt_jax.config import UserError
from zhgpt_jax.corpus import CorpusStats


def source_weights(spec: str) -> list[float] | None:
  """The normalised mixing weights of `spec`'s sources, or None when it gives none."""
  sources = corpus.parse_sources(spec)
  if sources[0].weight is None:
    return None
  total = sum(s.weight for s in sources)
  return [s.weight / total for s in sources]


def without_weights(spec: str) -> str:
  """`spec` with the weights taken off, for keys: changing a weight changes no file."""
  if spec == 'builtin':
    return spec
  return ','.join(s.name for s in corpus.parse_sources(spec))


@dataclasses.dataclass
class Block:
  """A piece of the corpus that one worker turns into documents: whole lines of one file
  (`kind` 'jsonl' or 'txt', `payload` bytes), or builtin documents already read ('docs',
  `payload` a list of (text, in_val)). `size`: the input bytes it stands for (progress)."""
  source: int
  path: str
  kind: str
  payload: bytes | list
  size: int


def _cut_point(data: bytes, paragraph: bool) -> int:
  """Where `data` may be cut so that a line (a paragraph) is never split: <= 0 if nowhere."""
  if not paragraph:
    return data.rfind(b'\n') + 1
  ends = [i + len(sep) for sep in (b'\n\n', b'\n\r\n') if (i := data.rfind(sep)) >= 0]
  return max(ends, default=0)


def file_blocks(path: str, paragraph: bool, block_bytes: int) -> Iterator[tuple[bytes, int]]:
  """(whole lines or paragraphs of about block_bytes, input bytes read) of one file."""
  try:
    gz = path.endswith('.gz')
    with (gzip.open if gz else open)(path, 'rb') as f:
      where = f.fileobj.tell if gz else f.tell   # compressed bytes, for progress
      carry, done = b'', 0
      while chunk := f.read(block_bytes):
        data = carry + chunk
        cut = _cut_point(data, paragraph)
        if cut <= 0:
          carry = data
          continue
        now = where()
        yield data[:cut], now - done
        carry, done = data[cut:], now
      if carry:
        yield carry, where() - done
  except (OSError, EOFError) as e:  # unreadable, or a truncated/corrupt .gz
    raise UserError(f'cannot read {path}: {e}') from e


def iter_blocks(data_cfg, n_heldout: int = corpus.HELDOUT_REVIEWS,
                block_bytes: int = 1 << 20) -> Iterator[Block]:
  """The corpus as Blocks in corpus order: sources in spec order, files in order, lines in
  order. Where the blocks are cut never changes the documents."""
  if data_cfg.corpus == 'builtin':
    stats = CorpusStats()  # the builtin skips are counted again by _builtin in each reader
    for path, group in itertools.groupby(corpus.builtin_documents(data_cfg, stats, n_heldout), lambda x: x[0]):
      for docs in _chunks(((t, v) for _, t, v in group), 4096):
        yield Block(0, path, 'docs', docs, sum(len(t) for t, _ in docs))
    return
  paragraph = data_cfg.txt_mode == 'paragraph'
  for i, source in enumerate(corpus.parse_sources(data_cfg.corpus)):
    for path in source.paths:
      kind = 'txt' if path.endswith('.txt') else 'jsonl'
      empty = True
      for data, size in file_blocks(path, kind == 'txt' and paragraph, block_bytes):
        empty = False
        yield Block(i, path, kind, data, size)
      if empty:  # still listed in the stats
        yield Block(i, path, kind, b'', 0)


def _chunks(items: Iterable, n: int) -> Iterator[list]:
  it = iter(items)
  while chunk := list(itertools.islice(it, n)):
    yield chunk


def block_lines(data: bytes) -> list[bytes]:
  """`data` split after each b'\\n' (which stays, as when a file is iterated)."""
  lines = [line + b'\n' for line in data.split(b'\n')]
  last = lines.pop()
  if last != b'\n':
    lines.append(last[:-1])
  return lines


def block_documents(block: Block, data_cfg, stats: CorpusStats) -> list[tuple[str, bool]]:
  """The (normalised document piece, in_val) of a block; skips are counted in `stats`."""
  stats.file(block.path)  # list every file, even one that gives nothing
  if block.kind == 'docs':
    labeled = block.payload
  else:
    lines = block_lines(block.payload)
    texts = (corpus.read_txt(lines, data_cfg.txt_mode, stats, block.path) if block.kind == 'txt'
             else corpus.read_jsonl(lines, block.path, data_cfg.text_field, stats))
    fraction = data_cfg.val_fraction
    labeled = ((t, corpus.is_val(t, fraction))
               for t in corpus.kept(block.path, texts, stats, data_cfg.fullwidth_to_halfwidth))
  by_piece = block.kind != 'docs'
  return [pv for text, val in labeled for pv in corpus.pieces(text, val, data_cfg, by_piece)]
