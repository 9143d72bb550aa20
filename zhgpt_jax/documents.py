"""The corpus as blocks for parallel workers: the reading half of `prepare`'s pipeline.

`iter_blocks` (in the main process) cuts every file of every source into blocks of about
1 MiB in corpus order (`formats.file_parts`: whole lines or paragraphs, decompressed; a
JSON array's records; parquet row groups); `block_documents` (in a worker) decodes, parses,
normalises, splits and cuts a block exactly as `corpus.iter_labeled` reads the same file, so
the documents, their order and every skip count are the same whichever way the corpus is read.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Iterator

from zhgpt_jax import corpus, formats
from zhgpt_jax.corpus import CorpusStats


def source_weights(spec: str, split: str = 'train') -> list[float] | None:
  """The normalised mixing weights of `spec`'s sources, or None when it gives none."""
  sources = corpus.parse_sources(spec, split=split)
  if sources[0].weight is None:
    return None
  total = sum(s.weight for s in sources)
  return [s.weight / total for s in sources]


def without_weights(spec: str, split: str = 'train') -> str:
  """`spec` with the weights taken off, for keys: changing a weight changes no file."""
  if spec == 'builtin':
    return spec
  return ','.join(s.name for s in corpus.parse_sources(spec, split=split))


@dataclasses.dataclass
class Block:
  """A piece of the corpus that one worker turns into documents: a `formats.Part` of one
  file (`kind` 'lines', 'records' or 'parquet', with its `payload`), or builtin documents
  already read ('docs', `payload` a list of (text, in_val)). `size`: the input bytes it
  stands for (progress)."""
  source: int
  path: str
  kind: str
  payload: bytes | list
  size: int


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
  for i, source in enumerate(corpus.parse_sources(data_cfg.corpus, split=data_cfg.split)):
    for path in source.paths:
      empty = True
      for part in corpus.file_parts(path, data_cfg, block_bytes):
        empty = False
        yield Block(i, path, part.kind, part.payload, part.size)
      if empty:  # still listed in the stats
        yield Block(i, path, 'records', [], 0)


def _chunks(items: Iterable, n: int) -> Iterator[list]:
  it = iter(items)
  while chunk := list(itertools.islice(it, n)):
    yield chunk


def block_documents(block: Block, data_cfg, stats: CorpusStats) -> list[tuple[str, bool]]:
  """The (normalised document piece, in_val) of a block; skips are counted in `stats`."""
  stats.file(block.path)  # list every file, even one that gives nothing
  if block.kind == 'docs':
    labeled = block.payload
  else:
    part = formats.Part(block.path, block.kind, block.payload, block.size)
    texts = corpus.part_texts(part, data_cfg, stats)
    fraction = data_cfg.val_fraction
    labeled = ((t, corpus.is_val(t, fraction))
               for t in corpus.kept(block.path, texts, stats, data_cfg.fullwidth_to_halfwidth))
  by_piece = block.kind != 'docs'
  return [pv for text, val in labeled for pv in corpus.pieces(text, val, data_cfg, by_piece)]
