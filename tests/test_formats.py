"""Data as it is downloaded: the same documents (and conversations) as JSON lines, JSON arrays,
.json.gz, .jsonl.zst, parquet, a hub-style snapshot and an `hf:` dataset give byte-identical
shards, tokenizers and SFT rows; damaged files are one line; a killed parquet prepare
resumes; peek shows what prepare would read. All files are written here (no download)."""

import collections
import gzip
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from zhgpt_jax import builtin_corpus, corpus, dataprep, documents, formats, peek, sft_format, sft_shards
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.config import UserError, default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sentences(n: int) -> list[str]:
  with open(builtin_corpus.paths()['news'], encoding='utf-8') as f:
    lines = [builtin_corpus.strip_pos_tags(l) for _, l in zip(range(n), f)]
  return [l for l in lines if l]


def records(n: int = 240) -> list[dict]:
  """Nested records ('meta.text'), with nulls and a missing struct among them."""
  out = []
  for i, text in enumerate(sentences(n)):
    meta = {'text': text, 'lang': 'zh'}
    if i % 17 == 5:
      meta = {'text': None, 'lang': 'zh'}   # a null cell
    out.append({'id': i, 'meta': None if i % 23 == 7 else meta, 'url': f'https://x/{i}'})
  return out


def skip_counts(recs) -> dict:
  return {'null': sum(r['meta'] is not None and r['meta']['text'] is None for r in recs),
          'missing': sum(r['meta'] is None for r in recs)}


def jsonl_bytes(recs) -> bytes:
  return ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in recs).encode('utf-8')


def write_parquet(path, recs, groups: int = 5):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  table = pa.Table.from_pylist(recs)
  pq.write_table(table, path, row_group_size=max(1, -(-len(recs) // groups)), compression='zstd')
  return str(path)


def write(path, data: bytes) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def snapshot(root, recs, other):
  """A hub dataset repo's layout: README.md, data/train-*.parquet, a validation file."""
  half = len(recs) // 2
  write(os.path.join(root, 'README.md'), b'---\nlicense: mit\n---\n# a dataset\n')
  write_parquet(os.path.join(root, 'data', 'train-00000-of-00002.parquet'), recs[:half], 3)
  write_parquet(os.path.join(root, 'data', 'train-00001-of-00002.parquet'), recs[half:], 3)
  write_parquet(os.path.join(root, 'data', 'validation-00000-of-00001.parquet'), other, 1)
  return str(root)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An offline Hugging Face cache that the test lays out itself: {repo: snapshot dir}."""
  import huggingface_hub.constants as hf_constants
  cache = tmp_path / 'hf_cache'
  monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
  formats.hub_snapshot.cache_clear()

  def repo(name: str) -> str:
    base = cache / f'datasets--{name.replace("/", "--")}'
    commit = hashlib.sha1(name.encode()).hexdigest()
    write(base / 'refs' / 'main', commit.encode())
    return str(base / 'snapshots' / commit)

  yield repo
  formats.hub_snapshot.cache_clear()


def all_formats(tmp_path, hub_cache, recs) -> dict[str, str]:
  """The same records in every format: {name: the corpus entry}."""
  d = tmp_path / 'formats'
  data = jsonl_bytes(recs)
  cut = len(data) // 3
  cut = data.index(b'\n', cut) + 1
  other = [{'id': -1, 'meta': {'text': '验证集的文档不该读到。', 'lang': 'zh'}, 'url': ''}]
  return {
      'jsonl': write(d / 'a.jsonl', data),
      'json_array': write(d / 'b.json', json.dumps(recs, ensure_ascii=False, indent=1).encode()),
      'json_lines': write(d / 'c.json', data),
      'json_gz': write(d / 'd.json.gz', gzip.compress(data)),
      'jsonl_zst': write(d / 'e.jsonl.zst', zstandard.ZstdCompressor().compress(data[:cut]) +
                         zstandard.ZstdCompressor(level=9).compress(data[cut:])),   # 2 frames
      'parquet': write_parquet(d / 'f.parquet', recs, 6),
      'snapshot': snapshot(d / 'snap', recs, other),
      'hf': (snapshot(hub_cache('someone/zh-web'), recs, other), 'hf:someone/zh-web')[1],
  }


def data_config(spec: str, field: str = 'meta.text'):
  c = default_config('tiny')
  c.data.corpus, c.data.text_field = spec, field
  c.data.val_fraction, c.data.tokenize_workers = 0.1, 1
  c.data.shard_tokens = 3000
  c.tokenizer.vocab_size = 400
  return c


def test_every_format_reads_the_same_documents_and_skips(tmp_path, hub_cache):
  recs = records()
  want_docs, want_skips = None, None
  for name, entry in all_formats(tmp_path, hub_cache, recs).items():
    data = data_config(entry).data
    stats = corpus.CorpusStats(text_field=data.text_field)
    docs = list(documents.iter_documents(data, 'all', stats))
    # The parallel reader, cut into parts of ~300 bytes, reads the same.
    blocked, block_stats = [], corpus.CorpusStats(text_field=data.text_field)
    n_blocks = 0
    for block in documents.iter_blocks(data, block_bytes=300):
      blocked += [t for t, _ in documents.block_documents(block, data, block_stats)]
      n_blocks += 1
    assert blocked == docs and n_blocks > 2, name
    skips = sum((f.skipped for f in stats.files.values()), collections.Counter())
    assert skips == sum((f.skipped for f in block_stats.files.values()), collections.Counter())
    if want_docs is None:
      want_docs, want_skips = docs, skips
    assert docs == want_docs, name
    assert '验证集' not in ''.join(docs)   # the snapshot's validation file is not train
    assert skips == want_skips == skip_counts(recs), name
  assert len(want_docs) == len(recs) - sum(want_skips.values())


def test_every_format_prepares_identical_shards_and_tokenizer(tmp_path, hub_cache):
  recs = records()
  want = None
  for name, entry in all_formats(tmp_path, hub_cache, recs).items():
    summary = dataprep.prepare(data_config(entry), str(tmp_path / 'runs' / name), progress=False)
    with open(os.path.join(summary.data_dir, 'tokenizer', 'tokenizer.json'), 'rb') as f:
      got = (dataprep.digest(summary.data_dir), hashlib.sha256(f.read()).hexdigest(),
             summary.documents, summary.tokens)
    meta = json.load(open(os.path.join(summary.data_dir, 'train', 'meta.json')))
    assert len(meta['shards']) > 1, name
    want = want or got
    assert got == want, name


def test_c4_named_gzip_json_lines_prepare(tmp_path):
  d = tmp_path / 'c4'
  rows = [{'text': t, 'timestamp': '2019-04-25T12:57:54Z', 'url': f'https://c4/{i}'}
          for i, t in enumerate(sentences(150))]
  write(d / 'c4-train.00000-of-01024.json.gz', gzip.compress(jsonl_bytes(rows)))
  write(d / 'c4-validation.00000-of-00008.json.gz', gzip.compress(jsonl_bytes(rows[:5])))
  c = data_config(str(d / 'c4-train.00000-of-01024.json.gz'), 'text')
  summary = dataprep.prepare(c, str(tmp_path / 'run'), progress=False)
  assert sum(summary.documents.values()) == len(rows)
  # The folder as a source: its train files only; data.split picks the others.
  c.data.corpus = str(d)
  assert corpus.parse_sources(c.data.corpus)[0].paths == (str(d / 'c4-train.00000-of-01024.json.gz'),)
  assert corpus.parse_sources(c.data.corpus, split='validation')[0].paths == (
      str(d / 'c4-validation.00000-of-00008.json.gz'),)
  assert documents.source_weights(f'{d}/c4-train.00000-of-01024.json.gz:3,'
                                f'{d}/c4-validation.00000-of-00008.json.gz:1') == [0.75, 0.25]
  with pytest.raises(UserError, match="has no files of split 'test'.*validation"):
    corpus.parse_sources(c.data.corpus, split='test')
  assert [formats.split_of(p) for p in ('data/train-00000-of-00009.parquet', 'train/x.jsonl',
                                        'dev.json', 'a/b.jsonl', 'constraint.jsonl')] == [
      'train', 'train', 'validation', None, None]


BAD = '''
import sys
paths, sys.argv = sys.argv[2:], ['main.py', 'prepare', '--config', 'configs/tiny.py',
                                 '--workdir', sys.argv[1], '--config.data.tokenize_workers=1']
from zhgpt_jax import cli as main
main.parse_flags(sys.argv)
for path in paths:   # main.main as `main.py prepare ... --config.data.corpus=PATH` runs it
  main._CONFIG.value.data.corpus = path
  try:
    main.main(sys.argv[:2])
  except SystemExit as e:
    print(f'exit {e.code}', file=sys.stderr, flush=True)
'''


def test_damaged_files_are_one_line_each(tmp_path):
  d = tmp_path / 'bad'
  recs = [{'text': t} for t in sentences(400)]
  data = jsonl_bytes(recs)
  whole = zstandard.ZstdCompressor().compress(data)
  parquet = open(write_parquet(d / 'full.parquet', recs, 4), 'rb').read()
  bad = {
      'trunc.jsonl.zst': (whole[:len(whole) // 2], 'truncated zstd'),
      'trunc.parquet': (parquet[:len(parquet) // 2], 'Parquet magic bytes not found'),
      'one.json': (json.dumps({'data': recs[:3]}).encode(), 'holds one JSON object \\(keys: data\\)'),
      'cut.json': (json.dumps(recs, ensure_ascii=False).encode()[:5000], 'JSON array'),
      'trunc.json.gz': (gzip.compress(data)[:4000], 'cannot read'),
  }
  paths = [write(d / name, raw) for name, (raw, _) in bad.items()]
  pq.write_table(pa.Table.from_pylist([{'content': 'x', 'url': 'u'}]), d / 'nocol.parquet')
  paths.append(str(d / 'nocol.parquet'))
  proc = subprocess.run([sys.executable, '-c', BAD, str(tmp_path / 'w'), *paths], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('main.py: error:')]
  assert proc.stderr.count('exit 2') == len(paths) == len(errors), proc.stderr[-3000:]
  wanted = [w for _, w in bad.values()] + ["has no column 'text'.*its columns: content, url"]
  for path, line, pattern in zip(paths, errors, wanted):
    assert path in line, line
    assert __import__('re').search(pattern, line), line


def test_sft_rows_identical_from_jsonl_parquet_and_alpaca_array(tmp_path, hub_cache):
  texts = sentences(300)
  pairs = [(texts[i], texts[i + 1]) for i in range(0, 240, 2)]
  messages = [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}
              for q, a in pairs]
  alpaca = [{'instruction': q, 'input': '', 'output': a} for q, a in pairs]
  alpaca[3]['output'] = None   # a null cell: skipped and counted, in every format
  messages[3]['messages'][1]['content'] = None
  d = tmp_path / 'sft'
  files = {
      'jsonl': write(d / 'chat.jsonl', jsonl_bytes(messages)),
      'parquet': write_parquet(d / 'chat.parquet', messages, 4),
      'alpaca': write(d / 'alpaca_gpt4_data_zh.json',
                      json.dumps(alpaca, ensure_ascii=False, indent=2).encode()),
      'alpaca_parquet': write_parquet(d / 'alpaca.parquet', alpaca, 3),
      'hf': (write_parquet(os.path.join(hub_cache('someone/chat-zh'), 'data',
                                        'train-00000-of-00001.parquet'), messages, 2),
             'hf:someone/chat-zh')[1],
  }
  kind = pq.ParquetFile(files['parquet']).schema_arrow.field('messages').type   # smoltalk's
  assert pa.types.is_list(kind) and str(kind.value_type) == 'struct<role: string, content: string>'
  tok = tok_lib.train_tokenizer(texts, 400)
  want = None
  for name, spec in files.items():
    c = default_config('tiny')
    c.task, c.sft.data, c.model.seq_len = 'sft', spec, 128
    c.data.tokenize_workers, c.data.val_fraction = 1, 0.1
    rows, meta, _ = sft_shards.cached_rows(c, str(tmp_path / 'data' / name), tok)
    assert meta['summary'].startswith('119 conversations; skipped 1 non-string content'), meta
    got = {s: {k: np.asarray(v).tobytes() for k, v in r.items()} for s, r in rows.items()}
    want = want or got
    assert got == want, name
  with pytest.raises(UserError, match=r"no column messages, conversations, instruction.*"
                                      'its columns: text'):
    list(sft_format.read_conversations(write_parquet(d / 'plain.parquet', [{'text': 'x'}]),
                                        sft_format.SftStats()))


KILLED = '''
import os, signal, sys
from zhgpt_jax import dataprep, formats, scan
from zhgpt_jax.config import default_config
c = default_config('tiny')
c.data.corpus, c.data.text_field, c.data.val_fraction = sys.argv[1], 'meta.text', 0.1
c.data.shard_tokens, c.tokenizer.vocab_size, c.data.tokenize_workers = 3000, 400, 1
blocks = formats.parquet_blocks
formats.parquet_blocks = lambda path, columns, size: blocks(path, columns, 3000)  # ~20 rows a block
scan.CHECKPOINT_BLOCKS = 1
where, calls = sys.argv[3], []
save = scan.write_progress
def dying(directory, state):
  save(directory, state)
  if where != 'never' and (where == 'scan') == ('writers' not in state):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGKILL)   # kill -9, right after a checkpoint
scan.write_progress = dying
print(dataprep.prepare(c, sys.argv[2], progress=False).documents)
'''


def test_killed_parquet_prepare_resumes_byte_identical(tmp_path):
  recs = records(600)
  path = write_parquet(tmp_path / 'corpus.parquet', recs, 12)
  run = lambda work, where: subprocess.run(
      [sys.executable, '-c', KILLED, path, str(tmp_path / work), where], cwd=ROOT,
      capture_output=True, text=True, timeout=300, check=False)
  whole = run('whole', 'never')
  assert whole.returncode == 0, whole.stderr[-2000:]
  for where, resumed in (('scan', 'scan: resuming at block 3'), ('shards', 'prepare: resuming')):
    killed = run(where, where)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    again = run(where, 'never')
    assert again.returncode == 0 and resumed in again.stdout, again.stdout + again.stderr[-2000:]
    assert dataprep.digest(str(tmp_path / where / 'data')) == dataprep.digest(
        str(tmp_path / 'whole' / 'data'))


def test_peek_shows_format_field_skips_and_first_documents(tmp_path, hub_cache, capsys):
  entries = all_formats(tmp_path, hub_cache, records())
  c = data_config(f'{entries["parquet"]},{entries["jsonl_zst"]}')
  c.data.peek = 2
  text = peek.peek(c)
  recs = records()
  first = [r['meta']['text'] for r in recs[:2]]
  skips = skip_counts(recs)
  assert (f'parquet, {len(recs)} rows in 6 row groups; read: meta (struct<text: string, '
          'lang: string>)') in text
  assert f"skipped: {skips['null']} null 'meta.text', {skips['missing']} missing 'meta.text'" in text
  assert 'JSON lines, zstd' in text
  assert text.count(f'document 1: {first[0]}') == 2 and text.count(f'document 2: {first[1]}') == 2
  c.sft.data = os.path.join(tmp_path, 'chat.json')
  write(c.sft.data, json.dumps([{'instruction': '你好', 'output': '你好！'}] * 3,
                               ensure_ascii=False).encode())
  text = peek.peek(c)
  assert 'a JSON array' in text and '3 records, 3 conversations' in text
  assert ('conversation 1: <|im_start|>user\\n你好<|im_end|>\\n<|im_start|>assistant\\n你好！'
          '<|im_end|>\\n') in text
  assert not os.path.exists(tmp_path / 'runs')


def readme_sources() -> list[list[str]]:
  """The flags of each row of README's table of named sources."""
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  table = text[text.index('The sources the project we grew from named'):]
  table = table[:table.index('\n\n', table.index('| source |'))]
  rows = [r for r in table.splitlines() if r.startswith('| ') and not r.startswith(('| source', '| ---'))]
  return [[f for group in re.findall(r'`(--config\.[^`]+)`', r.split(' | ')[2]) for f in group.split()]
          for r in rows]


def test_readme_source_table_lines_read_files_of_that_shape(tmp_path, hub_cache):
  texts = sentences(40)
  data = str(tmp_path / 'data')
  mnbvc = [{'文件名': f'{i}.txt', '是否待查文件': False, '段落': [
      {'行号': 1, '内容': texts[i], 'md5': 'x'}, {'行号': 2, '内容': texts[i + 1], 'md5': 'y'}],
      '时间': '20230101'} for i in range(0, 20, 2)]
  write(os.path.join(data, 'MNBVC', 'news', 'a.jsonl'), jsonl_bytes(mnbvc))
  c4 = [{'text': t, 'timestamp': '2019-04-25T12:57:54Z', 'url': 'https://c4'} for t in texts]
  for name in ('c4-train.00000-of-01024.json.gz', 'c4-validation.00000-of-00008.json.gz'):
    write(os.path.join(data, 'c4', 'en', name), gzip.compress(jsonl_bytes(c4)))
  web = [{'text': t, 'score': 3.5} for t in texts]
  write_parquet(os.path.join(data, 'hub', 'Fineweb-Edu-Chinese-V2.1', 'data',
                             'train-00000-of-00002.parquet'), web, 2)
  chats = [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}
           for q, a in zip(texts[::2], texts[1::2])]
  write_parquet(os.path.join(hub_cache('opencsg/smoltalk-chinese'), 'data',
                             'train-00000-of-00001.parquet'), chats, 2)
  alpaca = [{'instruction': q, 'input': '', 'output': a} for q, a in zip(texts[::2], texts[1::2])]
  write(os.path.join(data, 'alpaca_gpt4_data_zh.json'), json.dumps(alpaca, ensure_ascii=False).encode())
  rows = readme_sources()
  assert len(rows) == 5 and all(rows)
  for flags in rows:
    c = data_config('builtin', 'text')
    for flag in flags:
      key, value = flag[len('--config.'):].split('=', 1)
      value = value.strip("'").replace('/data/', f'{data}/')
      *parents, leaf = key.split('.')
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
    c.data.peek = 2
    text = peek.peek(c)
    shown = 'conversation 2: <|im_start|>user' if c.task == 'sft' else 'document 2: '
    assert shown in text and 'skipped: none' in text, (flags, text)
  c = data_config(f'{data}/MNBVC/', '段落.内容')
  c.data.peek = 1   # MNBVC's paragraphs joined by newlines: one document a file
  assert f'document 1: {texts[0]}\\n{texts[1]}' in peek.peek(c)


def test_plain_string_columns_reach_workers_as_buffers_with_nulls_counted(tmp_path):
  texts = sentences(30)
  for kind in (pa.string(), pa.large_string()):
    cells = [None if i % 7 == 3 else t for i, t in enumerate(texts)]
    path = str(tmp_path / f'{kind}.parquet')
    pq.write_table(pa.table({'text': pa.array(cells, kind), 'url': [f'u{i}' for i in range(30)]}),
                   path, row_group_size=8)
    data = data_config(path, 'text').data
    parts = list(corpus.file_parts(path, data, block_bytes=200))
    assert len(parts) > 3 and all(isinstance(p.payload, tuple) for p in parts)   # no pyarrow
    stats = corpus.CorpusStats(text_field='text')
    docs = list(documents.iter_documents(data, 'all', stats))
    assert docs == [t for t in cells if t is not None]
    assert stats.files[path].skipped == {'null': cells.count(None)}
