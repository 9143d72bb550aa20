"""sft_shards.py: SFT rows built once by streaming, cached by key, memory-mapped later."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from zhgpt_jax import chatml, formats, pool, sft_format, sft_shards
from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ['今天天气很好。', '我们一起去公园散步吧。', '好的，下午三点见。', '请问这本书多少钱？',
         '这本书二十五元。', '谢谢你的帮助！']


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  tok = tokenizer_lib.train_tokenizer(TEXTS * 20, 300)
  directory = str(tmp_path_factory.mktemp('tok'))
  tokenizer_lib.save_tokenizer(tok, directory)
  return directory


def chat_file(path, n, bad=True):
  """n conversations of 1-3 exchanges of varied length, a system turn in every third, every
  10th too long for 128 tokens, a few too long for one exchange; with `bad`, a malformed
  line and a lone user turn among them."""
  with open(path, 'w', encoding='utf-8') as f:
    for i in range(n):
      turns = [{'role': 'system', 'content': '你是助手。'}] if i % 3 == 0 else []
      for j in range(1 + i % 3):
        turns += [{'role': 'user', 'content': TEXTS[(i + j) % 6][:1 + (i * 7 + j) % 9]},
                  {'role': 'assistant', 'content': TEXTS[(i + 2 * j + 1) % 6][:1 + i % 5]}]
      if i % 10 == 9:   # too long: cut after its last whole exchange that fits
        turns += [{'role': 'user', 'content': TEXTS[1] * 4}, {'role': 'assistant', 'content': '好'}]
      if i % 37 == 5:   # too long even for one exchange: dropped
        turns[-2:] = [{'role': 'user', 'content': TEXTS[2] * 8}, turns[-1]]
      f.write(json.dumps({'messages': turns}, ensure_ascii=False) + '\n')
      if bad and i % 50 == 7:
        f.write('{"messages": [ not json\n')
        f.write(json.dumps({'messages': turns[-2:-1]}, ensure_ascii=False) + '\n')
  return str(path)


def sft_config(data, seq_len=128, workers=1, val_fraction=0.1):
  config = default_config('tiny')
  config.task, config.sft.data = 'sft', data
  config.model.seq_len, config.data.val_fraction = seq_len, val_fraction
  config.data.tokenize_workers = workers
  return config


def one_shot(config, tok):
  """The rows and summary line as packing everything in memory gives them."""
  encoder = chatml.ChatEncoder(tok)
  stats, fitted = sft_format.SftStats(), []
  for path in sft_format.data_paths(config.sft.data):
    with open(path, 'rb') as f:
      fitted += sft_format.fitted_conversations(
          formats.json_lines(f), path, encoder, stats, config.model.seq_len + 1, config.sft.long_policy,
          config.data.val_fraction)
  val = sft_format.final_val([f.val for f in fitted], [f.hash for f in fitted])
  pad, seq_len = tokenizer_lib.special_ids(tok).pad, config.model.seq_len
  splits, counts = {}, {}
  for split, keep in (('train', ~val), ('val', val)):
    enc = [f.encoded for f, k in zip(fitted, keep) if k]
    splits[split] = sft_format.packed_rows(enc, seq_len, pad)
    counts[split] = (len(enc), len(splits[split]['inputs']), sum(len(e.ids) - 1 for e in enc))
  return splits, sft_format.summary(stats, seq_len, counts['train'], counts['val'][:2])


def assert_rows_equal(got, want):
  assert got.keys() == want.keys()
  for split in want:
    for name in sft_shards.ARRAYS:
      assert isinstance(got[split][name], np.memmap)
      assert got[split][name].dtype == (np.uint8 if name == 'weights' else np.uint16)
      np.testing.assert_array_equal(got[split][name], want[split][name], err_msg=name)


def test_streaming_build_equals_packing_in_memory(tmp_path, tok_dir, monkeypatch):
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  path = chat_file(tmp_path / 'chat.jsonl', 400)
  # Many small blocks over 2 pool processes, and rows written 7 at a time.
  monkeypatch.setattr(sft_shards, 'BLOCK_BYTES', 4096)
  monkeypatch.setattr(sft_shards, 'BLOCK_ROWS', 7)
  config = sft_config(path, workers=2)
  rows, meta, reused = sft_shards.cached_rows(config, str(tmp_path / 'data'), tok)
  want, summary = one_shot(config, tok)
  assert not reused and meta['summary'] == summary
  assert summary.startswith('400 conversations; skipped 8 malformed JSON, 8 without an '
                            'assistant turn in ')
  assert len(want['train']['inputs']) > 50 and len(want['val']['inputs']) >= 1
  assert_rows_equal(rows, want)
  # A file with no val conversation by hash still validates on one: the smallest hash.
  config = sft_config(chat_file(tmp_path / 'small.jsonl', 5, bad=False), val_fraction=0.0)
  rows, meta, _ = sft_shards.cached_rows(config, str(tmp_path / 'data'), tok)
  want, summary = one_shot(config, tok)
  assert meta['summary'] == summary and ', 1 val in 1 rows' in summary
  assert_rows_equal(rows, want)


def test_second_start_maps_the_cache_without_tokenizing(tmp_path, tok_dir, monkeypatch):
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  path = chat_file(tmp_path / 'chat.jsonl', 60)
  config, data = sft_config(path), str(tmp_path / 'data')
  first, meta, reused = sft_shards.cached_rows(config, data, tok)
  directory = os.path.join(data, 'sft', meta['key'])
  files = {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
           for d, _, fs in os.walk(directory) for f in fs}
  assert not reused and len(files) == 11   # 2 splits x 5 arrays + meta.json

  def no_tokenizing(*args, **kwargs):
    raise AssertionError('the second start started a tokenizer pool')
  with monkeypatch.context() as m:
    m.setattr(pool, 'worker_pool', no_tokenizing)
    again, meta2, reused2 = sft_shards.cached_rows(config, data, tok)
  assert reused2 and meta2 == meta
  assert {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(directory) for f in fs} == files
  assert_rows_equal(again, {s: {k: np.asarray(v) for k, v in r.items()} for s, r in first.items()})
  # Another tokenizer, context or edited file: built again, under another key.
  other = tokenizer_lib.train_tokenizer(TEXTS * 10, 290)
  assert not sft_shards.cached_rows(config, data, other)[2]
  config.model.seq_len = 64
  assert not sft_shards.cached_rows(config, data, tok)[2]
  chat_file(path, 61)
  assert not sft_shards.cached_rows(config, data, tok)[2]
  assert len(os.listdir(os.path.join(data, 'sft'))) == 4


KILLED = '''
import os, signal, sys
from zhgpt_jax import sft_format, sft_shards, tokenizer
from zhgpt_jax.config import default_config
config = default_config('tiny')
config.task, config.sft.data, config.model.seq_len = "sft", sys.argv[1], 128
config.data.tokenize_workers, config.data.val_fraction = 1, 0.1
fill = sft_format.fill_rows
calls = []
def fill_then_die(*args):
  calls.append(1)
  if len(calls) == 3:   # kill -9 in the middle of writing the train rows
    os.kill(os.getpid(), signal.SIGKILL)
  return fill(*args)
sft_format.fill_rows = fill_then_die
sft_shards.BLOCK_ROWS = 4
sft_shards.cached_rows(config, sys.argv[2], tokenizer.load_tokenizer(sys.argv[3]))
'''


def test_a_killed_first_start_leaves_nothing_trusted(tmp_path, tok_dir):
  path = chat_file(tmp_path / 'chat.jsonl', 100)
  data = str(tmp_path / 'data')
  proc = subprocess.run([sys.executable, '-c', KILLED, path, data, tok_dir], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  left = os.listdir(os.path.join(data, 'sft'))
  assert len(left) == 1 and '.tmp-' in left[0]   # only the dead build's temporary directory
  assert 'tokens.bin' in os.listdir(os.path.join(data, 'sft', left[0]))
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  config = sft_config(path)
  rows, meta, reused = sft_shards.cached_rows(config, data, tok)
  assert not reused and os.listdir(os.path.join(data, 'sft')) == [meta['key']]
  assert_rows_equal(rows, one_shot(config, tok)[0])


def test_sft_task_packs_once_then_maps(tmp_path, capsys):
  from zhgpt_jax import sft
  tok = tokenizer_lib.train_tokenizer(TEXTS * 20, 300)
  chat = tmp_path / 'chat.jsonl'
  with open(chat, 'w', encoding='utf-8') as f:
    for i in range(40):
      f.write(json.dumps({'messages': [
          {'role': 'user', 'content': TEXTS[i % 4] * (1 + i % 3)},
          {'role': 'assistant', 'content': TEXTS[(i + 1) % 4]}]}, ensure_ascii=False) + '\n')
  config = default_config('tiny')
  config.task, config.sft.data = 'sft', str(chat)
  config.model.seq_len, config.train.short_seq_steps, config.train.per_device_batch = 64, 0, 1
  config.data.tokenize_workers = 1
  first = sft.make_task(config, str(tmp_path / 'w1'), tok)
  config.data.cache_dir = str(tmp_path / 'w1' / 'data')
  second = sft.make_task(config, str(tmp_path / 'w2'), tok)
  out = capsys.readouterr().out
  assert 'saved to' in out and 'read from' in out and out.count('40 conversations') == 2
  a, b = next(iter(first.train_loader)), next(iter(second.train_loader))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert [x['inputs'].tolist() for x in first.eval_batches()] == [
      x['inputs'].tolist() for x in second.eval_batches()]
