"""dataprep.py (prepare): shard contents, meta.json, reuse, and rebuilding whatever is stale."""

import copy
import itertools
import json
import os
import shutil

import numpy as np
import pytest

from zhgpt_jax import builtin_corpus, corpus, documents
from zhgpt_jax import dataprep
from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import UserError


def expected_stream(config, split, tok):
  """The split as a direct encode of its documents (exact duplicates dropped, the first kept),
  each followed by <|endoftext|>."""
  seen, docs = set(), []
  for doc, val in documents.iter_labeled(config.data, corpus.CorpusStats()):
    if config.data.dedup == 'none' or doc not in seen:
      seen.add(doc)
      if val == (split == 'val'):
        docs.append(doc)
  plain = tokenizer_lib.as_plain_text(tok)
  ids = [i for e in plain.encode_batch(docs) for i in e.ids + [0]]
  return np.array(ids, dtype=np.uint16), docs


def mtimes(directory):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(directory) for f in fs if f != '.lock'}


@pytest.fixture
def small(tmp_path, make_tiny_config):
  """A 150-document corpus with a 300-token vocab: cheap to rebuild again and again."""
  corpus_dir = tmp_path / 'corpus'
  corpus_dir.mkdir()
  with open(builtin_corpus.paths()['news'], encoding='utf-8') as f:
    news = [builtin_corpus.strip_pos_tags(l) for l in itertools.islice(f, 100)]
  (corpus_dir / 'news.txt').write_text('\n'.join(news) + '\n', encoding='utf-8')
  reviews = builtin_corpus.split_reviews()[0][:50]
  (corpus_dir / 'reviews.jsonl').write_text(
      ''.join(json.dumps({'text': t}, ensure_ascii=False) + '\n' for t, _ in reviews),
      encoding='utf-8')
  config = make_tiny_config(str(corpus_dir))
  config.data.val_fraction = 0.2
  config.data.shard_tokens = 3000
  config.tokenizer.vocab_size = 300
  return config, str(tmp_path / 'work')


def test_shards_equal_direct_encoding(tiny_data):
  tok = tokenizer_lib.load_tokenizer(os.path.join(tiny_data.data_dir, 'tokenizer'))
  for split in ('train', 'val'):
    tokens, meta = dataprep.load_split(tiny_data.data_dir, split)
    want, docs = expected_stream(tiny_data.config, split, tok)
    assert tokens.dtype == np.uint16 and meta['dtype'] == 'uint16'
    np.testing.assert_array_equal(tokens, want)
    assert meta['tokens'] == len(want) == tiny_data.summary.tokens[split]
    assert meta['documents'] == len(docs) == (tokens == 0).sum()
    assert meta['characters'] == sum(map(len, docs))
    assert meta['utf8_bytes'] == sum(len(d.encode()) for d in docs)
    assert meta['tokenizer_hash'] == tokenizer_lib.tokenizer_hash(
        os.path.join(tiny_data.data_dir, 'tokenizer'))
    assert (meta['vocab_size'], meta['eot_id']) == (1000, 0)
    assert meta['split_rule']['val_fraction'] == 0.1
    assert sorted(os.path.basename(p) for p in meta['sources']) == ['news.txt', 'reviews.jsonl']
    sizes = [s['tokens'] for s in meta['shards']]
    assert sum(sizes) == len(want) and all(n == 50_000 for n in sizes[:-1])
    assert 0 < sizes[-1] <= 50_000
  assert len(dataprep.load_split(tiny_data.data_dir, 'train')[1]['shards']) >= 5
  assert tiny_data.summary.documents == {'train': 1788, 'val': 193}   # 19 repeated news lines
  groups = dataprep.load_split(tiny_data.data_dir, 'train')[1]['source_groups']
  assert [(g['exact_duplicates'], g['near_duplicates']) for g in groups] == [(19, 0)]
  text = str(tiny_data.summary)
  assert 'built tokenizer, train, val' in text and 'chars/token on val' in text


def test_second_prepare_reuses_everything(tiny_data, tmp_path, capsys):
  config = copy.deepcopy(tiny_data.config)
  config.data.cache_dir = str(tmp_path / 'data')
  shutil.copytree(tiny_data.data_dir, config.data.cache_dir)
  before = mtimes(config.data.cache_dir)
  config.data.tokenize_workers = 2         # how, not what: no rebuild
  summary = dataprep.prepare(config, str(tmp_path), progress=False)
  assert summary.reused and summary.tokens == tiny_data.summary.tokens
  assert 'reused tokenizer and shards' in capsys.readouterr().out
  assert mtimes(config.data.cache_dir) == before


def test_changed_inputs_rebuild(small):
  config, workdir = small
  first = dataprep.prepare(config, workdir, progress=False)
  assert not first.reused_tokenizer and first.reused_splits == ()

  config.data.shard_tokens = 1000           # shards only
  s = dataprep.prepare(config, workdir, progress=False)
  assert s.reused_tokenizer and s.reused_splits == () and s.tokens == first.tokens
  assert len(dataprep.load_split(dataprep.data_dir(config, workdir), 'train')[1]['shards']) > 5

  with open(os.path.join(config.data.corpus, 'news.txt'), 'a', encoding='utf-8') as f:
    f.write('新的一行，新的文档。\n')       # the corpus: everything
  s = dataprep.prepare(config, workdir, progress=False)
  assert not s.reused_tokenizer and s.reused_splits == ()
  assert sum(s.documents.values()) == sum(first.documents.values()) + 1

  config.tokenizer.vocab_size = 320         # the tokenizer: everything
  s = dataprep.prepare(config, workdir, progress=False)
  assert not s.reused_tokenizer and s.vocab_size == 320
  tokens, meta = dataprep.load_split(dataprep.data_dir(config, workdir), 'train')
  assert tokens.max() < 320 and meta['vocab_size'] == 320
  assert dataprep.prepare(config, workdir, progress=False).reused


def test_stale_or_broken_splits_are_rebuilt(small):
  config, workdir = small
  dataprep.prepare(config, workdir, progress=False)
  root = dataprep.data_dir(config, workdir)
  train, _ = dataprep.load_split(root, 'train')
  val, _ = dataprep.load_split(root, 'val')
  train, val = np.array(train), np.array(val)

  os.remove(os.path.join(root, 'val', 'meta.json'))       # a run killed before meta.json
  os.makedirs(os.path.join(root, '.tmp-val-12345'))       # ... and its leftovers
  s = dataprep.prepare(config, workdir, progress=False)
  assert s.reused_splits == () and s.reused_tokenizer   # one pass writes both splits
  np.testing.assert_array_equal(dataprep.load_split(root, 'val')[0], val)
  np.testing.assert_array_equal(dataprep.load_split(root, 'train')[0], train)
  assert not [n for n in os.listdir(root) if n.startswith('.tmp-')]

  meta_path = os.path.join(root, 'train', 'meta.json')
  with open(meta_path, encoding='utf-8') as f:
    meta = json.load(f)
  meta['key'] = 'stale'
  with open(meta_path, 'w', encoding='utf-8') as f:
    json.dump(meta, f)
  assert dataprep.prepare(config, workdir, progress=False).reused_splits == ()

  shard = os.path.join(root, 'train', 'shard_00001.bin')
  with open(shard, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(UserError, match='shard_00001.bin is missing or not'):
    dataprep.load_split(root, 'train')
  assert dataprep.prepare(config, workdir, progress=False).reused_splits == ()
  np.testing.assert_array_equal(dataprep.load_split(root, 'train')[0], train)


def test_process_pool_writes_the_same_shards(small):
  config, workdir = small
  dataprep.prepare(config, workdir, progress=False)
  pooled = copy.deepcopy(config)
  pooled.data.tokenize_workers = 2
  pooled.data.cache_dir = os.path.join(workdir, 'pooled')
  pooled.tokenizer.path = os.path.join(dataprep.data_dir(config, workdir), 'tokenizer')
  dataprep.prepare(pooled, workdir, progress=False)
  for split in ('train', 'val'):
    a, meta_a = dataprep.load_split(dataprep.data_dir(config, workdir), split)
    b, meta_b = dataprep.load_split(pooled.data.cache_dir, split)
    np.testing.assert_array_equal(a, b)
    assert meta_a['tokenizer_hash'] == meta_b['tokenizer_hash']


def test_given_tokenizer_is_used(small, tiny_data):
  config, workdir = small
  config.tokenizer.path = os.path.join(tiny_data.data_dir, 'tokenizer')
  s = dataprep.prepare(config, workdir, progress=False)
  assert s.vocab_size == 1000
  assert (dataprep.load_split(dataprep.data_dir(config, workdir), 'val')[1]['tokenizer_hash']
          == tokenizer_lib.tokenizer_hash(config.tokenizer.path))
  tok = tokenizer_lib.load_tokenizer(config.tokenizer.path)
  tokens, _ = dataprep.load_split(dataprep.data_dir(config, workdir), 'train')
  np.testing.assert_array_equal(tokens, expected_stream(config, 'train', tok)[0])
  config.tokenizer.path = os.path.join(workdir, 'missing')
  with pytest.raises(UserError, match='no tokenizer at'):
    dataprep.prepare(config, workdir, progress=False)


def test_errors_and_dtype(tmp_path, small):
  with pytest.raises(UserError, match='no prepared train split'):
    dataprep.load_split(str(tmp_path), 'train')
  config, workdir = small
  config.data.corpus = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match='nowhere does not exist'):
    dataprep.prepare(config, workdir, progress=False)
  assert dataprep._dtype(65536) == np.uint16 and dataprep._dtype(65537) == np.uint32
  config.data.cache_dir = '/somewhere'
  assert dataprep.data_dir(config, workdir) == '/somewhere'


def test_empty_val_split(small):
  config, workdir = small
  config.data.val_fraction = 0.0
  s = dataprep.prepare(config, workdir, progress=False)
  tokens, meta = dataprep.load_split(dataprep.data_dir(config, workdir), 'val')
  assert tokens.size == 0 and tokens.dtype == np.uint16 and meta['shards'] == []
  assert s.documents['val'] == 0 and s.chars_per_token > 0 and 'chars/token on train' in str(s)
