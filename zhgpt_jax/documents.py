"""The corpus's documents, builtin or the user's: read in one pass, or cut into blocks.

`iter_labeled` / `iter_documents` read the whole corpus in one pass (tests, benches, peek).
For `prepare`'s parallel passes, `iter_blocks` (in the main process) cuts every file of
every source into blocks of about 1 MiB in corpus order (`formats.file_parts`: whole lines or paragraphs, decompressed; a
JSON array's records; parquet row groups); `block_documents` (in a worker) decodes, parses,
normalises, splits and cuts a block exactly as `iter_labeled` reads the same file, so the
documents, their order and every skip count are the same whichever way the corpus is read.

The builtin corpus is read less `exclude`, the texts of the SFT held-out reviews: resolved
once by the caller (`builtin_corpus.heldout(config.sft.heldout)`; None: the default set).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Iterator

from zhgpt_jax import builtin_corpus, corpus, formats
from zhgpt_jax.config import UserError
from zhgpt_jax.corpus import CorpusStats


def sources(spec: str, key: str = 'config.data.corpus', split: str = 'train'
            ) -> list[corpus.Source]:
  """The sources of config.data.corpus: the builtin corpus's files as one source, or the user's
  entries (`corpus.parse_sources`)."""
  if spec == 'builtin':
    return [corpus.Source('builtin', None, tuple(builtin_corpus.paths().values()))]
  return corpus.parse_sources(spec, key, split)


def source_weights(spec: str, split: str = 'train') -> list[float] | None:
  """The normalised mixing weights of `spec`'s sources, or None when it gives none."""
  found = sources(spec, split=split)
  if found[0].weight is None:
    return None
  total = sum(s.weight for s in found)
  return [s.weight / total for s in found]


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


def _excluded(exclude: frozenset[str] | None) -> frozenset[str]:
  return builtin_corpus.heldout() if exclude is None else exclude


def _labeled(data_cfg, stats: CorpusStats, exclude: frozenset[str] | None
             ) -> Iterator[tuple[str, str, bool]]:
  """(source path, document piece, in_val) for the whole corpus; raises if it gives nothing."""
  stats.text_field = data_cfg.text_field
  builtin = data_cfg.corpus == 'builtin'
  source = (builtin_corpus.documents(data_cfg, stats, _excluded(exclude)) if builtin
            else corpus.user_documents(data_cfg, stats))
  found = False
  for path, text, val in source:
    found = True
    yield from ((path, p, v) for p, v in corpus.pieces(text, val, data_cfg, not builtin))
  if not found:
    raise UserError(f'config.data.corpus={data_cfg.corpus!r}: no usable documents '
                    f'({stats.summary()})')


def iter_labeled(data_cfg, stats: CorpusStats,
                 exclude: frozenset[str] | None = None) -> Iterator[tuple[str, bool]]:
  """Yields (document, in_val) for the whole corpus in one pass, long documents cut.

  `data_cfg` is `config.data`; `stats` counts every document and skip as they are read;
  `exclude`: the builtin reviews kept out of pretraining (the module docstring says).
  Raises UserError for a bad `corpus` entry or when not one usable document is found.
  """
  for path, doc, val in _labeled(data_cfg, stats, exclude):
    f = stats.file(path)
    f.documents += 1
    f.characters += len(doc)
    yield doc, val


def iter_documents(data_cfg, split: str, stats: CorpusStats,
                   exclude: frozenset[str] | None = None) -> Iterator[str]:
  """Yields the normalised documents of `split` ('train', 'val' or 'all').

  `stats` counts the documents of `split` and the skips of the whole corpus. Raises
  UserError as `iter_labeled` does, or for an unknown split.
  """
  if split not in ('train', 'val', 'all'):
    raise UserError(f"split must be 'train', 'val' or 'all', not {split!r}")
  for path, doc, val in _labeled(data_cfg, stats, exclude):
    if split == 'all' or val == (split == 'val'):
      f = stats.file(path)
      f.documents += 1
      f.characters += len(doc)
      yield doc


def iter_blocks(data_cfg, exclude: frozenset[str] | None = None,
                block_bytes: int = 1 << 20) -> Iterator[Block]:
  """The corpus as Blocks in corpus order: sources in spec order, files in order, lines in
  order. Where the blocks are cut never changes the documents."""
  if data_cfg.corpus == 'builtin':
    stats = CorpusStats()  # the builtin skips are counted by each reader itself
    docs = builtin_corpus.documents(data_cfg, stats, _excluded(exclude))
    for path, group in itertools.groupby(docs, lambda x: x[0]):
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
