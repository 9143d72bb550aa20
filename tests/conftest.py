"""Shared fixtures: a small real corpus, prepared once per session.

`tiny_data` is what model/train tests build on: a slice of the builtin corpus written as user
files, a 1000-token tokenizer and its shards, and a matching tiny config.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import ml_collections
import pytest

from zhgpt_jax import builtin_corpus
from zhgpt_jax import dataprep
from zhgpt_jax.config import default_config, validate

TINY_NEWS_LINES = 1500
TINY_REVIEWS = 500

# A sweep over model variants or config switches (a parameter named one of these) keeps its
# first case in the fast local loop; the other cases, each seconds of compiling, are `slow`
# (CI runs them all). A variant added to a sweep is `slow` by itself.
SWEEPS = ('variant', 'switch')


def pytest_collection_modifyitems(items):
  for item in items:
    indices = getattr(getattr(item, 'callspec', None), 'indices', {})
    if any(indices.get(name, 0) for name in SWEEPS):
      item.add_marker(pytest.mark.slow)


@dataclasses.dataclass(frozen=True)
class TinyData:
  """A prepared tiny corpus. Deep-copy `config` before changing it: the session shares it."""
  config: ml_collections.ConfigDict
  workdir: str
  data_dir: str
  corpus_dir: str
  summary: dataprep.PrepareSummary


def write_tiny_corpus(directory: str) -> None:
  """Writes news.txt (People's Daily lines, tags stripped) and reviews.jsonl to `directory`."""
  os.makedirs(directory, exist_ok=True)
  with open(builtin_corpus.paths()['news'], encoding='utf-8') as f:
    news = [builtin_corpus.strip_pos_tags(line) for line in itertools.islice(f, TINY_NEWS_LINES)]
  with open(os.path.join(directory, 'news.txt'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(news) + '\n')
  train, _ = builtin_corpus.split_reviews()
  with open(os.path.join(directory, 'reviews.jsonl'), 'w', encoding='utf-8') as f:
    for text, label in train[:TINY_REVIEWS]:
      f.write(json.dumps(dict(text=text, label=label), ensure_ascii=False) + '\n')


def tiny_config(corpus_dir: str) -> ml_collections.ConfigDict:
  """default_config('tiny') shrunk to run in seconds on a CPU, reading `corpus_dir`."""
  c = default_config('tiny')
  c.data.corpus = corpus_dir
  c.data.val_fraction = 0.1
  c.data.shard_tokens = 50_000          # several shards, so their seams get tested
  c.data.tokenize_workers = 1           # no process pool: the fixture stays cheap
  c.tokenizer.vocab_size = 1000
  c.tokenizer.max_train_chars = 1_000_000
  c.model.update(n_layer=2, n_head=2, d_model=64, seq_len=64, vocab_multiple=64)
  c.train.update(steps=20, per_device_batch=4, short_seq_steps=0, log_every=5, eval_every=10,
                 eval_max_batches=2, eval_batch=4, ckpt_every=10, sample_tokens=8)
  c.optim.warmup_steps = 2
  validate(c)
  return c


@pytest.fixture(scope='session')
def make_tiny_config():
  """`tiny_config`, for a test that brings its own corpus directory."""
  return tiny_config


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory) -> TinyData:
  """A tiny corpus (1500 news lines + 500 reviews), its tokenizer and shards, built once."""
  root = tmp_path_factory.mktemp('tiny_data')
  corpus_dir = str(root / 'corpus')
  write_tiny_corpus(corpus_dir)
  config = tiny_config(corpus_dir)
  workdir = str(root / 'workdir')
  summary = dataprep.prepare(config, workdir, progress=False)
  return TinyData(config=config, workdir=workdir, data_dir=dataprep.data_dir(config, workdir),
                  corpus_dir=corpus_dir, summary=summary)
