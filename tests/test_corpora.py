"""Corpora at size: sources and weights, dotted fields, blocks, dedup, the tokenizer sample,
and resuming a killed prepare (all on small synthetic files)."""

import copy
import gzip
import json
import os
import random

import numpy as np
import pytest

from zhgpt_jax import builtin_corpus, corpus, dataprep, dedup, documents, formats, scan
from zhgpt_jax.config import UserError, default_config

SENTENCES = None


def sentences():
  global SENTENCES
  if SENTENCES is None:
    with open(builtin_corpus.paths()['news'], encoding='utf-8') as f:
      lines = [builtin_corpus.strip_pos_tags(l) for _, l in zip(range(3000), f)]
    SENTENCES = [s for l in lines for s in l.split('。') if len(s) > 8]
  return SENTENCES


def synth_documents(n, seed, style=''):
  rng = random.Random(seed)
  pool = sentences()
  return [style + '。'.join(rng.choice(pool) for _ in range(rng.randint(2, 6))) + '。'
          for _ in range(n)]


def write_jsonl(path, texts, field='text'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wt', encoding='utf-8') as f:
    for t in texts:
      f.write(json.dumps({field: t}, ensure_ascii=False) + '\n')


def test_dotted_text_field_joins_lists():
  assert corpus.field_text({'段落': [{'内容': '甲'}, {'内容': ['乙', '丙']}]}, '段落.内容') == '甲\n乙\n丙'
  assert corpus.field_text({'a': {'b': 'x'}}, 'a.b') == 'x'
  assert corpus.field_text({'a.b': 'y'}, 'a.b') == 'y'    # a key with a dot wins
  assert corpus.field_text({'text': ['一', '二']}, 'text') == '一\n二'
  for record, reason in (({'a': {'c': 'x'}}, 'missing'), ({'a': 3}, 'not_string'),
                         ({'a': ['x', 1]}, 'not_string')):
    with pytest.raises(corpus._FieldError, match=reason):
      corpus.field_text(record, 'a.b' if 'c' in str(record) else 'a')


def test_sources_and_weights(tmp_path):
  write_jsonl(str(tmp_path / 'news' / 'a.jsonl'), ['一'])
  write_jsonl(str(tmp_path / 'web' / 'b.jsonl'), ['二'])
  news, web = str(tmp_path / 'news'), str(tmp_path / 'web')
  plain = corpus.parse_sources(f'{news},{web}')
  assert [s.weight for s in plain] == [None, None] and documents.source_weights(f'{news},{web}') is None
  spec = f'{news}/*.jsonl:2,{web}/:1'
  got = corpus.parse_sources(spec)
  assert [(s.weight, len(s.paths)) for s in got] == [(2.0, 1), (1.0, 1)]
  assert documents.source_weights(spec) == pytest.approx([2 / 3, 1 / 3])
  assert documents.without_weights(spec) == f'{news}/*.jsonl,{web}/'
  with pytest.raises(UserError, match='every source a weight'):
    corpus.parse_sources(f'{news}:2,{web}')
  with pytest.raises(UserError, match='must be a number > 0'):
    corpus.parse_sources(f'{news}:0')
  assert formats.resolve_paths(f'{news},{web}') == [p for s in plain for p in s.paths]


def test_blocks_read_what_the_serial_reader_reads(tmp_path):
  docs = synth_documents(60, 0)
  write_jsonl(str(tmp_path / 'a.jsonl.gz'), docs[:30])
  with open(tmp_path / 'b.txt', 'w', encoding='utf-8') as f:
    f.write('\n\n'.join(d.replace('。', '。\n', 1) for d in docs[30:]) + '\n\n\n')
    f.write('坏\xff段\n\n'.encode('utf-8', 'surrogateescape').decode('utf-8', 'replace'))
  with open(tmp_path / 'b.txt', 'ab') as f:
    f.write(b'\xff\xfe bad line\nrest\n\n{"broken\n')
  for mode in ('line', 'paragraph'):
    cfg = copy.deepcopy(default_config().data)
    cfg.corpus, cfg.txt_mode, cfg.max_doc_chars = str(tmp_path), mode, 40
    want_stats, got_stats = corpus.CorpusStats(), corpus.CorpusStats()
    want = list(documents.iter_labeled(cfg, want_stats))
    got = [d for b in documents.iter_blocks(cfg, block_bytes=100)
           for d in documents.block_documents(b, cfg, got_stats)]
    assert got == want and len(got) > 60
    assert {p: dict(f.skipped) for p, f in got_stats.files.items()} == {
        p: dict(f.skipped) for p, f in want_stats.files.items()}


def test_dedup_exact_and_near(tmp_path):
  rng = random.Random(1)
  base = synth_documents(300, 2)
  near = []
  for t in base[:40]:   # change 1 character in 100: Jaccard of 5-grams ~0.9
    chars = list(t)
    for k in rng.sample(range(len(chars)), max(1, len(chars) // 100)):
      chars[k] = '〇'
    near.append(''.join(chars))
  texts = base + near + base[:25]
  removed = dedup.exact_removed(np.array([dedup.text_hash(t) for t in texts], np.uint64))
  sigs = dedup.signatures(texts, 5)
  keys = dedup.band_keys(sigs, *dedup.lsh_params(0.8))
  from_files = removed.copy()
  dedup.near_removed(list(keys.T), sigs, removed, 0.8)
  assert (removed[-25:] == dedup.EXACT).all()
  assert (removed[:300] == dedup.KEEP).all()                  # no original removed
  assert (removed[300:340] == dedup.NEAR).sum() >= 36         # >= 90% of the near copies
  sigs.tofile(tmp_path / 'sigs.bin')                          # the scan's scratch files
  for b in range(keys.shape[1]):
    keys[:, b].tofile(tmp_path / f'band{b}.bin')
  dedup.near_removed([str(tmp_path / f'band{b}.bin') for b in range(keys.shape[1])],
                     str(tmp_path / 'sigs.bin'), from_files, 0.8)
  np.testing.assert_array_equal(from_files, removed)
  assert dedup.lsh_params(0.8) == (21, 6)


def make_corpus(root, sizes=(300, 600, 900)):
  names = []
  for i, n in enumerate(sizes):
    docs = synth_documents(n, 10 + i, style=('新闻：', '网页：', '书：')[i])
    name = str(root / f'src{i}')
    write_jsonl(os.path.join(name, 'part.jsonl'), docs + docs[:n // 10])   # 10% repeated
    names.append(name)
  return names


def test_tokenizer_sample_shares_follow_the_corpus(tmp_path, make_tiny_config, capsys):
  names = make_corpus(tmp_path)
  config = make_tiny_config(','.join(names))
  total = sum(len(d) for i, n in enumerate((300, 600, 900))
              for d in synth_documents(n, 10 + i, ('新闻：', '网页：', '书：')[i]))
  config.tokenizer.max_train_chars = total // 4
  config.tokenizer.vocab_size = 400
  found = scan.scan(config, frozenset(), True, False, str(tmp_path / 'scratch'))
  assert (found.removed == dedup.EXACT).sum() == 30 + 60 + 90
  keep = (found.removed == 0) & ~found.val
  want = np.bincount(found.source[keep], found.chars[keep]) / found.chars[keep].sum()
  got = np.bincount(found.sample_sources, [len(t) for t in found.sample])
  assert got.sum() <= 1.01 * config.tokenizer.max_train_chars   # the trainer cuts the last one
  assert got.sum() >= 0.95 * config.tokenizer.max_train_chars
  np.testing.assert_allclose(got / got.sum(), want, rtol=0.1)
  line = dataprep.sample_shares(found, names, config.tokenizer.max_train_chars)
  assert line.startswith('tokenizer sample:') and f'{names[2]} ' in line


def test_killed_prepare_resumes_byte_identical(tmp_path, make_tiny_config, monkeypatch, capsys):
  names = make_corpus(tmp_path, (200, 300, 400))
  config = make_tiny_config(','.join(f'{n}:{w}' for n, w in zip(names, (1, 2, 3))))
  config.data.shard_tokens = 4000
  config.tokenizer.vocab_size = 400
  config.data.dedup = 'near'
  whole = dataprep.prepare(config, str(tmp_path / 'whole'), progress=False)
  want = dataprep.digest(whole.data_dir)
  meta = json.load(open(os.path.join(whole.data_dir, 'train', 'meta.json')))
  assert [g['exact_duplicates'] for g in meta['source_groups']] == [20, 30, 40]
  assert len({s['source'] for s in meta['shards']}) == 3
  assert sum(g['tokens'] for g in meta['source_groups']) == meta['tokens']

  # Killed in the scan (after its 2nd checkpoint, bytes written past it): the rerun continues
  # the scan, then is killed in the shard pass; the third run finishes it.
  monkeypatch.setattr(scan, 'CHECKPOINT_BLOCKS', 1)
  real_checkpoint, checkpoints = scan._checkpoint, {'n': 0}

  def dying_checkpoint(work_dir, files, state):
    real_checkpoint(work_dir, files, state)
    checkpoints['n'] += 1
    if checkpoints['n'] == 2:
      for f in files.values():
        f.write(b'\x01\x02' * 50)
      raise KeyboardInterrupt

  monkeypatch.setattr(scan, '_checkpoint', dying_checkpoint)
  work = str(tmp_path / 'killed')
  with pytest.raises(KeyboardInterrupt):
    dataprep.prepare(config, work, progress=False)
  assert checkpoints['n'] == 2
  monkeypatch.setattr(scan, '_checkpoint', real_checkpoint)
  capsys.readouterr()

  saves = {'n': 0}
  real_save = scan.write_progress

  def dying_save(build, state):   # dies after the shard pass's 3rd checkpoint, with bytes
    real_save(build, state)       # written past it (the scan's checkpoints pass through)
    if 'writers' not in state:
      return
    saves['n'] += 1
    if saves['n'] == 3:
      for split in ('train', 'val'):
        shard = state['writers'][split]['shards'][-1]['name']
        with open(os.path.join(build, split, shard), 'ab') as f:
          f.write(b'\x01\x02' * 50)
      raise KeyboardInterrupt

  monkeypatch.setattr(scan, 'write_progress', dying_save)
  with pytest.raises(KeyboardInterrupt):
    dataprep.prepare(config, work, progress=False)
  assert 'scan: resuming at block 2 of the corpus' in capsys.readouterr().out
  monkeypatch.setattr(scan, 'write_progress', real_save)
  again = dataprep.prepare(config, work, progress=False)
  assert 'prepare: resuming at block' in capsys.readouterr().out
  assert dataprep.digest(again.data_dir) == want
  assert again.documents == whole.documents and again.tokens == whole.tokens
