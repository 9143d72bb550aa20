"""chat_shards.py: SFT rows packed once, cached by key, memory-mapped on later starts."""

import json

import numpy as np

from zhgpt_jax import chat_shards
from zhgpt_jax.config import default_config


def rows(n, seq_len, base=0):
  x = (np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len) + base) % 5000
  return dict(inputs=x, targets=x + 1, weights=(x % 2).astype(np.uint8),
              segment_ids=np.ones_like(x), positions=np.tile(np.arange(seq_len), (n, 1)))


def test_rows_are_built_once_then_mapped(tmp_path):
  chat = tmp_path / 'chat.jsonl'
  chat.write_text(json.dumps({'messages': []}) + '\n', encoding='utf-8')
  config = default_config('tiny')
  config.sft.data, config.model.seq_len = str(chat), 16
  calls = []

  def build():
    calls.append(1)
    return {'train': rows(6, 16), 'val': rows(2, 16, 7)}, {'summary': '8 conversations'}

  first, meta, reused = chat_shards.cached_rows(config, str(tmp_path / 'data'), 'tok', build)
  again, meta2, reused2 = chat_shards.cached_rows(config, str(tmp_path / 'data'), 'tok', build)
  assert (reused, reused2, len(calls)) == (False, True, 1)
  assert meta2['summary'] == '8 conversations' and meta2['splits'] == ['train', 'val']
  for split, want in (('train', rows(6, 16)), ('val', rows(2, 16, 7))):
    for name, array in want.items():
      got = again[split][name]
      assert isinstance(got, np.memmap) and got.dtype in (np.uint8, np.uint16)
      np.testing.assert_array_equal(got, array)
  # Another tokenizer, context or edited file: built again, under another key.
  for change in (lambda: None, lambda: setattr(config.model, 'seq_len', 32),
                 lambda: chat.write_text('{}\n\n', encoding='utf-8')):
    change()
    tok = 'tok2' if len(calls) == 1 else 'tok'
    assert not chat_shards.cached_rows(config, str(tmp_path / 'data'), tok, build)[2]
  assert len(calls) == 4
  assert len(list((tmp_path / 'data' / 'sft').iterdir())) == 4


def test_sft_task_packs_once_then_maps(tmp_path, capsys):
  from zhgpt_jax import sft
  from zhgpt_jax import tokenizer as tokenizer_lib
  from zhgpt_jax.config import default_config
  texts = ['今天天气很好。', '我们一起去公园散步吧。', '好的，下午三点见。', '请问这本书多少钱？']
  tok = tokenizer_lib.train_tokenizer(texts * 20, 300)
  chat = tmp_path / 'chat.jsonl'
  with open(chat, 'w', encoding='utf-8') as f:
    for i in range(40):
      f.write(json.dumps({'messages': [
          {'role': 'user', 'content': texts[i % 4] * (1 + i % 3)},
          {'role': 'assistant', 'content': texts[(i + 1) % 4]}]}, ensure_ascii=False) + '\n')
  config = default_config('tiny')
  config.task, config.sft.data = 'sft', str(chat)
  config.model.seq_len, config.train.short_seq_steps, config.train.per_device_batch = 64, 0, 1
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
