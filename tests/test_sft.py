"""SFT: chat formats, the ChatML mask, packing, long conversations, the builtin task, chat."""

import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from zhgpt_jax import checkpoint as ckpt_lib
from zhgpt_jax import builtin_corpus, chat, chatml, formats, sft, sft_format, sft_shards, train
from zhgpt_jax import model as M
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.config import UserError, default_config

SEQ = 64
STEPS = 80   # SFT steps of the toy task
CONVERSATION = [
    {'role': 'system', 'content': '你是一个有帮助的助手。'},
    {'role': 'user', 'content': '今天天气怎么样？'},
    {'role': 'assistant', 'content': '今天晴，气温二十度。'},
    {'role': 'user', 'content': '谢谢'},
    {'role': 'assistant', 'content': '不客气！'},
]


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
  """A 600-token byte-level BPE tokenizer trained on 300 builtin reviews, saved."""
  train_reviews, _ = builtin_corpus.split_reviews()
  tok = tok_lib.train_tokenizer([t for t, _ in train_reviews[:300]], vocab_size=600)
  d = str(tmp_path_factory.mktemp('tok'))
  tok_lib.save_tokenizer(tok, d, model_max_length=SEQ)
  return d


@pytest.fixture(scope='module')
def encoder(tok_dir):
  return chatml.ChatEncoder(tok_lib.load_tokenizer(tok_dir))


def sft_config(data, tok_dir, **train_overrides):
  c = default_config('tiny')
  c.task = 'sft'
  c.sft.data = data
  c.tokenizer.path = tok_dir
  c.data.val_fraction = 0.1
  c.model.update(n_layer=2, n_head=2, d_model=64, seq_len=SEQ, vocab_multiple=64)
  c.optim.update(lr=3e-3, warmup_steps=10)
  c.train.update(steps=150, per_device_batch=8, short_seq_steps=0, log_every=50,
                 eval_every=150, ckpt_every=150, eval_batch=8, eval_max_batches=2,
                 peak_flops=1e11, sample_tokens=4)
  c.train.update(train_overrides)
  return c


def write_jsonl(path, lines):
  with open(path, 'wb') as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else
              (json.dumps(line, ensure_ascii=False) + '\n').encode('utf-8'))
  return str(path)


# ----------------------------------------------------------------------------- reading

def test_formats_parse_to_one_canonical_conversation(tmp_path):
  system, (u1, a1, u2, a2) = CONVERSATION[0]['content'], [t['content'] for t in CONVERSATION[1:]]
  messages = {'messages': CONVERSATION}
  sharegpt = {'conversations': [{'from': 'system', 'value': system},
                                {'from': 'human', 'value': u1}, {'from': 'gpt', 'value': a1},
                                {'from': 'human', 'value': u2}, {'from': 'gpt', 'value': a2}]}
  messy = {'messages': [{'role': 'system', 'content': f'  {system}\r\n'}, *CONVERSATION[1:],
                        {'role': 'user', 'content': '还有吗'}]}   # trailing user turn: dropped
  alpaca = {'instruction': '翻译成英文', 'input': '你好', 'output': 'Hello', 'system': system}
  path = write_jsonl(tmp_path / 'a.jsonl', [messages, sharegpt, messy, alpaca])
  with open(path, 'rb') as f, gzip.open(tmp_path / 'b.jsonl.gz', 'wb') as g:
    g.write(f.read())
  stats = sft_format.SftStats()
  got = list(sft_format.read_conversations(f'{tmp_path}/*.jsonl.gz,{path}', stats))
  assert got[:3] == [CONVERSATION] * 3
  assert got[3] == [{'role': 'system', 'content': system},
                    {'role': 'user', 'content': '翻译成英文\n你好'},
                    {'role': 'assistant', 'content': 'Hello'}]
  assert got[4:] == got[:4]
  assert stats.conversations == 8 and stats.skipped == 0
  assert list(stats.files) == [str(tmp_path / 'b.jsonl.gz'), path]


def test_bad_records_are_counted_per_reason(tmp_path):
  good = {'messages': CONVERSATION[1:3]}
  bad = [
      b'{"messages": [ not json\n',
      '{"messages": [{"role": "user", "content": "\xff"}]}\n'.encode('latin-1'),  # invalid UTF-8
      b'\n',
      {'text': 'a pretraining document'},
      {'messages': [{'role': 'tool', 'content': 'x'}, {'role': 'assistant', 'content': 'y'}]},
      {'conversations': [{'from': 'human', 'value': '问'}, {'from': 'gpt', 'value': ' \n'}]},
      {'messages': [{'role': 'assistant', 'content': '先答'}, {'role': 'user', 'content': '后问'}]},
      {'messages': [{'role': 'user', 'content': '问'}, {'role': 'user', 'content': '又问'},
                    {'role': 'assistant', 'content': '答'}]},
      {'messages': [{'role': 'user', 'content': '只有问题'}]},
      {'messages': [{'role': 'user', 'content': ['list']}, {'role': 'assistant', 'content': 'a'}]},
      {'instruction': '问', 'output': 7},
  ]
  path = write_jsonl(tmp_path / 'mixed.jsonl', [good, *bad, good])
  stats = sft_format.SftStats()
  assert list(sft_format.read_conversations(path, stats)) == [CONVERSATION[1:3]] * 2
  assert dict(stats.files[path]) == dict(
      kept=2, malformed=1, invalid_utf8=1, blank=1, unknown_format=1, bad_role=1, empty_turn=1,
      not_alternating=2, no_assistant=1, not_string=2)
  assert stats.summary().startswith('2 conversations; skipped 1 malformed JSON, 1 invalid UTF-8')
  assert f'in {path}' in stats.summary()


def test_bad_data_spec_is_one_user_error(tmp_path, tok_dir, encoder):
  read = lambda spec: list(sft_format.read_conversations(spec, sft_format.SftStats()))
  with pytest.raises(UserError, match='config.sft.data: .*nope.jsonl does not exist'):
    read(str(tmp_path / 'nope.jsonl'))
  (tmp_path / 'notes.txt').write_text('x')
  with pytest.raises(UserError, match='sft.data: .*notes.txt is not a .jsonl/.json/.parquet file'):
    read(str(tmp_path / 'notes.txt'))
  with pytest.raises(UserError, match='sft.data: directory .* has no .jsonl/.json/.parquet'):
    read(str(tmp_path))
  path = write_jsonl(tmp_path / 'bad.jsonl', [b'nope\n', {'messages': []}])
  tok = tok_lib.load_tokenizer(tok_dir)
  with pytest.raises(UserError, match=r"no usable conversations \(0 conversations; skipped 1 "
                                      r'malformed JSON, 1 without an assistant turn'):
    sft_shards.cached_rows(sft_config(path, tok_dir), str(tmp_path / 'data'), tok)
  assert os.listdir(tmp_path / 'data' / 'sft') == []   # nothing left behind


# ----------------------------------------------------------------------------- encoding

def test_template_equals_hf_apply_chat_template(tok_dir, encoder):
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(tok_dir)

  def hf_ids(messages, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(out['input_ids'] if hasattr(out, 'keys') else out)

  odd = [{'role': 'user', 'content': 'Hi, 2 个 emoji 😀\n第二行\t缩进 and "quotes"'},
         {'role': 'assistant', 'content': "It's ok。  好的…"}]
  for conversation in (CONVERSATION, odd, CONVERSATION[1:3]):
    assert encoder.encode([conversation])[0].ids.tolist() == hf_ids(conversation)
    assert encoder.prompt(conversation[:-1]) == hf_ids(conversation[:-1],
                                                       add_generation_prompt=True)


def test_mask_covers_exactly_the_assistant_spans(encoder):
  convs = [CONVERSATION, CONVERSATION[1:3],
           [{'role': 'user', 'content': '一加一等于几？'}, {'role': 'assistant', 'content': '二'}]]
  rows = sft_format.packed_rows(encoder.encode(convs), 128, pad_id=3)
  found = {}
  for r in range(len(rows['inputs'])):
    for seg in set(rows['segment_ids'][r].tolist()) - {0}:
      at = rows['segment_ids'][r] == seg
      weighted = rows['targets'][r][at & (rows['weights'][r] == 1)]
      full = np.concatenate([rows['inputs'][r][at][:1], rows['targets'][r][at]])
      found[tok_lib.decode(encoder.tokenizer, full)] = tok_lib.decode(encoder.tokenizer, weighted)
  assert len(found) == 3
  for conv in convs:
    text = ''.join(f'<|im_start|>{t["role"]}\n{t["content"]}<|im_end|>\n' for t in conv)
    assert found[text] == ''.join(t['content'] + '<|im_end|>' for t in conv
                                  if t['role'] == 'assistant')


def test_long_conversations_are_cut_at_a_turn_or_dropped(encoder):
  enc = encoder.encode([CONVERSATION])[0]
  first_exchange = enc.ends[2]          # system, user, assistant
  cut = sft_format.fit(enc, enc.ends[3] + 2, 'truncate')   # room for the 2nd user turn, not its answer
  assert cut.ids.tolist() == enc.ids[:first_exchange].tolist()
  assert cut.roles == ['system', 'user', 'assistant'] and cut.ends == enc.ends[:3]
  assert sft_format.fit(enc, len(enc.ids), 'truncate') is enc
  assert sft_format.fit(enc, len(enc.ids) - 1, 'drop') is None
  assert sft_format.fit(enc, first_exchange - 1, 'truncate') is None   # not one assistant turn fits


def test_long_conversation_counts(tmp_path, tok_dir, encoder):
  short = {'messages': CONVERSATION[1:3]}
  long = {'messages': CONVERSATION[1:3] + [{'role': 'user', 'content': '长' * 80},
                                          {'role': 'assistant', 'content': '好' * 80}]}
  hopeless = {'messages': [{'role': 'user', 'content': '长' * 200},
                           {'role': 'assistant', 'content': '好'}]}
  path = write_jsonl(tmp_path / 'long.jsonl', [short, long, hopeless] * 3)
  for policy, truncated, dropped, kept in (('truncate', 3, 3, 6), ('drop', 0, 6, 3)):
    stats = sft_format.SftStats()
    with open(path, 'rb') as f:
      fitted = sft_format.fitted_conversations(formats.json_lines(f), path, encoder, stats,
                                                SEQ + 1, policy, 0.1)
    assert (stats.truncated, stats.too_long) == (truncated, dropped)
    assert len(fitted) == kept and all(len(f.encoded.ids) <= SEQ + 1 for f in fitted)
    assert f'{truncated} truncated and {dropped} dropped' in stats.summary()
    # The task's cached rows say the same, and hold one val conversation at least.
    c = sft_config(path, tok_dir)
    c.sft.long_policy, c.data.tokenize_workers = policy, 1
    _, meta, _ = sft_shards.cached_rows(c, str(tmp_path / policy), encoder.tokenizer)
    assert meta['summary'].startswith(f'9 conversations; {truncated} truncated and {dropped} '
                                      'dropped as longer than the context; ')
    n_val = int(meta['summary'].split(', ')[-1].split(' val ')[0])
    assert n_val >= 1 and f'{kept - n_val} train conversations' in meta['summary']


# ----------------------------------------------------------------------------- packing

@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=60))
def test_pack_places_every_item_once_within_capacity(lengths):
  rows = sft_format.pack(lengths, 32)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
  assert sft_format.pack(lengths, 32) == rows
  # Any-fit packing never leaves two rows that would fit together: when a row was opened,
  # its first item did not fit in any earlier row.
  loads = [sum(lengths[i] for i in row) for row in rows]
  assert all(a + b > 32 for i, a in enumerate(loads) for b in loads[i + 1:])


def test_packed_conversations_never_attend_across(encoder):
  convs = [CONVERSATION[1:3], [{'role': 'user', 'content': '你好'},
                               {'role': 'assistant', 'content': '你好呀'}]]
  encoded = encoder.encode(convs)
  rows = sft_format.packed_rows(encoded, 128, pad_id=3)
  assert len(rows['inputs']) == 1 and set(rows['segment_ids'][0].tolist()) == {0, 1, 2}
  cfg = M.GPTConfig(vocab_size=640, real_vocab_size=600, n_layer=2, n_head=2, n_kv_head=2,
                    d_model=32, seq_len=128, mlp_hidden=64)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  apply = jax.jit(lambda r: M.GPT(cfg).apply(
      {'params': params}, r['inputs'], positions_BxL=r['positions'],
      segment_ids_BxL=r['segment_ids'])[0][0])

  packed = np.asarray(apply(rows))
  changed = {k: v.copy() for k, v in rows.items()}
  first = rows['segment_ids'][0] == 1
  changed['inputs'][0][first] = (changed['inputs'][0][first] + 7) % 600
  other = np.asarray(apply(changed))
  second = rows['segment_ids'][0] == 2
  np.testing.assert_allclose(other[second], packed[second], atol=1e-5)
  assert not np.allclose(other[first], packed[first], atol=1e-3)
  # And a conversation packed second gives the logits it gives alone in a row, from position 0.
  alone = sft_format.packed_rows(encoded[1:], 128, pad_id=3)
  n = len(encoded[1].ids) - 1
  np.testing.assert_allclose(packed[second], np.asarray(apply(alone))[:n], atol=1e-5)


# ----------------------------------------------------------------------------- builtin task

def test_builtin_task_loader_and_eval(tok_dir, monkeypatch):
  split = builtin_corpus.split_reviews
  # The real held-out split; only 600 of the 16k training reviews, to stay quick.
  monkeypatch.setattr(builtin_corpus, 'split_reviews', lambda n: (split(n)[0][::27], split(n)[1]))
  c = sft_config('builtin', tok_dir, per_device_batch=4, eval_batch=8, eval_max_batches=0)
  c.sft.heldout, c.sft.eval_examples = 40, 6
  run = train.build(c, 'unused', with_data=False)
  task = sft.make_task(c, 'unused', run.tokenizer)
  it = iter(task.train_loader)
  batch = next(it)
  shape = (jax.local_device_count(), 1, 4, SEQ)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      'inputs': (shape, 'int32'), 'targets': (shape, 'int32'), 'weights': (shape, 'float32'),
      'segment_ids': (shape, 'int32'), 'positions': (shape, 'int32')}
  # Every segment is one instruction with a one-word answer: 正面 or 负面, then <|im_end|>.
  tok = run.tokenizer
  for row in range(4):
    x = {k: v[0, 0, row] for k, v in batch.items()}
    for seg in set(x['segment_ids'].tolist()) - {0}:
      at = x['segment_ids'] == seg
      assert x['positions'][at].tolist() == list(range(at.sum()))
      answer = tok_lib.decode(tok, x['targets'][at & (x['weights'] == 1)])
      assert answer in ('正面<|im_end|>', '负面<|im_end|>')
  # Resuming from the iterator's state continues with the same batches.
  state = it.get_state()
  ahead = [next(it)['inputs'] for _ in range(2)]
  again = iter(task.train_loader)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['inputs'], ahead[0])
  # Eval: every held-out review exactly once, with its answer weighted.
  batches = list(task.eval_batches())
  segments = sum(len(set(b['segment_ids'][d, r].tolist()) - {0})
                 for b in batches for d in range(shape[0]) for r in range(8))
  assert segments == 40
  assert sum(float(b['weights'].sum()) for b in batches) > 0
  _, heldout = builtin_corpus.split_reviews(40)
  examples = sft.heldout_examples(heldout, 6)
  assert [label for _, label in examples] == [1, 0, 1, 0, 1, 0]
  assert not {t for t, _ in examples} & {t for t, _ in builtin_corpus.split_reviews(40)[0]}


# ----------------------------------------------------------------------------- learning + chat

def toy_example(rng, reviews):
  """'copy the label': a review fragment, then 标签：正面/负面, answered with that label."""
  label = int(rng.integers(2))
  noise = reviews[int(rng.integers(len(reviews)))][:int(rng.integers(4, 16))]
  return f'{noise}。标签：{sft.LABELS[label]}', sft.LABELS[label]


@pytest.mark.slow   # fine-tunes and chats end to end
def test_sft_learns_a_toy_task_and_chats(tmp_path, tok_dir):
  rng = np.random.default_rng(0)
  reviews = [t.replace('正', '').replace('负', '') for t, _ in builtin_corpus.split_reviews()[0][:2000]]
  train_rows = [toy_example(rng, reviews) for _ in range(600)]
  path = write_jsonl(tmp_path / 'toy.jsonl', [
      {'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}
      for q, a in train_rows])
  tests = [toy_example(rng, reviews[1000:]) for _ in range(64)]
  config = sft_config(path, tok_dir, steps=STEPS)
  workdir = str(tmp_path / 'run')
  run = train.build(config, workdir, sft.make_task)
  encoder = chatml.ChatEncoder(run.tokenizer)
  prompts = [encoder.prompt([{'role': 'user', 'content': q}]) for q, _ in tests]
  answers = [a for _, a in tests]
  params = M.init_params(run.cfg, jax.random.PRNGKey(0))
  before = sft.accuracy(run.cfg, params, encoder, prompts, answers)
  state = run.strategy.put_state(train.new_state(run.optimizer, params, config.seed))
  batches = iter(run.task.train_loader)
  for _ in range(STEPS):
    state, metrics = run.train_step(state, run.strategy.put_batch(next(batches)))
  state = run.strategy.to_host(state)
  after = sft.accuracy(run.cfg, jax.tree.map(jnp.asarray, state['params']), encoder, prompts,
                       answers)
  assert float(metrics['loss'][0]) < 0.3
  assert before <= 0.6 and after >= 0.9, (before, after)

  ckpt_lib.save_run_files(workdir, config, run.tokenizer_dir)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
  ckpt.save(STEPS, state, batches, {'step': STEPS})   # the loader's state saves with it
  ckpt.close()
  # The same checkpoint in the terminal chat, fed like piped stdin.
  lines = iter(['', tests[0][0], '/reset', tests[1][0], tests[2][0], '/exit', 'never read'])
  written = []

  def read(prompt):
    written.append(prompt)
    return next(lines)

  config.sample.update(temperature=0.0, max_new_tokens=8)
  chat.chat(workdir, config.sample, read=read, write=written.append)
  text = ''.join(written)
  assert text.startswith(f'{workdir} step {STEPS}: /reset clears the history, /exit quits\n')
  assert text.count('你: ') == 6 and '(history cleared)' in text
  replies = [r.split('\n')[0] for r in text.split('助手: ')[1:]]
  assert replies == [a for _, a in tests[:3]]
  assert next(lines) == 'never read'

  # End of input ends the chat too; the history holds the exchange.
  lines = iter([tests[3][0]])

  def read_to_eof(_):
    try:
      return next(lines)
    except StopIteration:
      raise EOFError from None

  written = []
  history = chat.chat_loop(run.cfg, jax.tree.map(jnp.asarray, state['params']), run.tokenizer,
                          config.sample, read=read_to_eof, write=written.append)
  assert history == [{'role': 'user', 'content': tests[3][0]},
                     {'role': 'assistant', 'content': tests[3][1]}]
  assert ''.join(written) == f'助手: {tests[3][1]}\n\n'


def test_chat_keeps_the_newest_turns_that_fit(encoder):
  history = [CONVERSATION[0]] + [{'role': r, 'content': f'第{i}句话' * 3}
                                 for i in range(6) for r in ('user', 'assistant')][:-1]
  ids, kept = chat.chat_prompt(encoder, history, 10_000)
  assert kept == history and ids == encoder.prompt(history)
  budget = len(encoder.prompt([CONVERSATION[0]] + history[-3:]))
  ids, kept = chat.chat_prompt(encoder, history, budget)
  assert kept == [CONVERSATION[0]] + history[-3:] and len(ids) == budget
  with pytest.raises(UserError, match='does not fit'):
    chat.chat_prompt(encoder, history, 5)
