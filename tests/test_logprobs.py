"""Log-probabilities through `main.py serve`: the completions API as lm-evaluation-harness uses
it (list prompts, echo, logprobs, max_tokens=0), chat logprobs, checked with the official
openai client against log-softmax of our model's logits; and the lm_eval command
(`--model local-completions`) against the server equal to `lm_eval --model hf` on the export.

One server for the module, on test_harness.py's random tiny model (vocabulary unpadded).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from serving import ROOT, Served
from test_harness import (TASKS, assert_same_as_hf, hf_run, model, read_results,  # noqa: F401
                          read_samples, tasks)   # model, tasks: the module fixtures
from zhgpt_jax import checkpoint, logprobs as logprobs_lib
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax import model as model_lib

pytestmark = pytest.mark.slow  # a server and lm_eval runs against it (minutes); CI runs them

PROMPTS = ['村民们都很高兴', '今天', '人民的生活', '我们', '经济发展', '中国', '学生们说', '城市和']


@pytest.fixture(scope='module')
def server(model):
  s = Served(model[0])
  yield s
  s.close()


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=f'{server.url}/v1', api_key='none', max_retries=0, timeout=120)


@pytest.fixture(scope='module')
def ref(model):
  cfg, params, tokenizer, _, _ = checkpoint.load_model(model[0])

  def logp(ids):
    """log-softmax of our logits at each position of `ids` [n, V]."""
    logits = model_lib.GPT(cfg).apply({'params': params}, jnp.array([ids]))[0][0]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))

  return cfg, tokenizer, logp


def check_scores(lp, ids, token_logprobs, top_logprobs, tokenizer, n_top, start=1):
  """token_logprobs[i] = lp[i-1, ids[i]] and top_logprobs[i] the n_top best, from `start`."""
  for i in range(start, len(ids)):
    assert abs(token_logprobs[i] - lp[i - 1, ids[i]]) < 1e-5, i
    best = np.argsort(-lp[i - 1])[:n_top]
    want = {logprobs_lib.token_text(tokenizer, int(t)): float(lp[i - 1, t]) for t in best}
    got = top_logprobs[i]
    assert sorted(got) == sorted(want), i
    assert all(abs(got[k] - want[k]) < 1e-5 for k in want)


def test_echo_scores_eight_prompts_in_order(client, ref):
  cfg, tokenizer, logp = ref
  reply = client.completions.create(model='model', prompt=PROMPTS, max_tokens=0, echo=True,
                                    logprobs=5)
  assert [c.index for c in reply.choices] == list(range(8))
  for text, c in zip(PROMPTS, reply.choices):
    ids = tokenizer.encode(text).ids
    assert c.text == text and c.finish_reason == 'length'
    lp = c.logprobs
    assert lp.tokens == [logprobs_lib.token_text(tokenizer, i) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == logprobs_lib.text_offsets(tokenizer, ids)
    assert ''.join(lp.tokens) == text or 'bytes:' in ''.join(lp.tokens)
    check_scores(logp(ids), ids, lp.token_logprobs, lp.top_logprobs, tokenizer, 5)
  assert reply.usage.completion_tokens == 0
  assert reply.usage.prompt_tokens == sum(len(tokenizer.encode(p).ids) for p in PROMPTS)


def test_token_prompts_and_generated_tokens_have_the_raw_models_logprobs(client, ref):
  cfg, tokenizer, logp = ref
  prompts = [tokenizer.encode(p).ids for p in PROMPTS[:3]]
  reply = client.completions.create(model='model', prompt=prompts, max_tokens=4, echo=True,
                                    logprobs=2, temperature=0)
  assert [c.index for c in reply.choices] == [0, 1, 2]
  for p, c in zip(prompts, reply.choices):
    lp = c.logprobs
    ids = ids_of(tokenizer, lp.tokens)
    assert ids[:len(p)] == p and len(p) < len(ids) <= len(p) + 4
    assert c.text == tokenizer.decode(ids, skip_special_tokens=False)
    check_scores(logp(ids), ids, lp.token_logprobs, lp.top_logprobs, tokenizer, 2)
    # greedy: every generated token is the most likely one
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values())
               for i in range(len(p), len(ids)))
  # Penalties, temperature and filters change what is picked, never the numbers reported:
  # each token's log-prob is the raw log-softmax at its position.
  reply = client.completions.create(model='model', prompt=prompts[0], max_tokens=6, echo=True,
                                    logprobs=3, temperature=1.5, seed=1,
                                    extra_body=dict(top_k=3, repetition_penalty=2.0))
  lp = reply.choices[0].logprobs
  ids = ids_of(tokenizer, lp.tokens)
  check_scores(logp(ids), ids, lp.token_logprobs, lp.top_logprobs, tokenizer, 3)
  # Without echo: the generated tokens only, offsets into the reply.
  reply = client.completions.create(model='model', prompt=prompts[1], max_tokens=3,
                                    logprobs=0, temperature=0)
  lp = reply.choices[0].logprobs
  assert len(lp.tokens) == 3 and lp.top_logprobs == [{}, {}, {}] and lp.text_offset[0] == 0
  ids = prompts[1] + ids_of(tokenizer, lp.tokens)
  full, n = logp(ids), len(prompts[1])
  for i, x in enumerate(lp.token_logprobs):
    assert abs(x - full[n + i - 1, ids[n + i]]) < 1e-5


def ids_of(tokenizer, tokens):
  """The token ids of logprobs' token strings (text, or vLLM's bytes:\\x.. form)."""
  by_bytes = {}
  for i in range(tokenizer.get_vocab_size()):
    by_bytes.setdefault(tok_lib.token_bytes(tokenizer, i), []).append(i)
  out = []
  for t in tokens:
    data = (bytes(int(h, 16) for h in t[len('bytes:'):].split('\\x')[1:])
            if t.startswith('bytes:') else t.encode('utf-8'))
    assert len(by_bytes[data]) == 1, t
    out.append(by_bytes[data][0])
  return out


def test_chat_logprobs(client, ref):
  cfg, tokenizer, logp = ref
  from zhgpt_jax import chatml, serve
  messages = [dict(role='user', content='你好，今天怎么样？')]
  reply = client.chat.completions.create(model='model', messages=messages, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=4)
  content = reply.choices[0].logprobs.content
  prompt = serve.chat_prompt_ids(chatml.ChatEncoder(tokenizer), messages)
  ids = prompt + ids_of(tokenizer, [c.token for c in content])
  lp = logp(ids)
  for k, c in enumerate(content):
    i = len(prompt) + k
    assert abs(c.logprob - lp[i - 1, ids[i]]) < 1e-5
    assert bytes(c.bytes) == tok_lib.token_bytes(tokenizer, ids[i])
    assert [t.token for t in c.top_logprobs] == [
        logprobs_lib.token_text(tokenizer, int(t)) for t in np.argsort(-lp[i - 1])[:4]]
  assert reply.choices[0].message.content == tokenizer.decode(ids[len(prompt):],
                                                               skip_special_tokens=False)


@pytest.mark.parametrize('kind, kw, param', [
    ('text', dict(prompt='今天', logprobs=21), 'logprobs'),
    ('text', dict(prompt='今天', logprobs=-1), 'logprobs'),
    ('text', dict(prompt='今天', n=2), 'n'),
    ('text', dict(prompt='今天', max_tokens=0), 'max_tokens'),
    ('text', dict(prompt='今天', logprobs=1, stream=True), 'logprobs'),
    ('text', dict(prompt=['今天', '我们'], stream=True), 'prompt'),
    ('text', dict(prompt='今天', best_of=2), 'best_of'),
    ('chat', dict(top_logprobs=2), 'top_logprobs'),
    ('chat', dict(logprobs=True, top_logprobs=21), 'top_logprobs'),
])
def test_bad_combinations_are_400_naming_the_field(client, kind, kw, param):
  with pytest.raises(openai.BadRequestError) as e:
    if kind == 'text':
      client.completions.create(model='model', **kw)
    else:
      client.chat.completions.create(model='model', messages=[dict(role='user', content='你好')],
                                     **kw)
  assert e.value.status_code == 400 and e.value.body['param'] == param, e.value.body
  assert param in e.value.body['message']


# ---------------------------------------------------------------- lm_eval through the server

def test_lm_eval_command_through_the_server_equals_lm_eval_hf(server, model, tasks, tmp_path):
  """lm_eval's API model keeps a row to max_length - 1 tokens (one is left to generate), so
  --model hf runs with max_length=62 for the same rows and rolling windows as 64 here."""
  hf_samples, hf_results = hf_run(model, tasks, max_length=62)
  # One --include_path: ours and the test's YAML side by side.
  path = tmp_path / 'tasks'
  path.mkdir()
  for src in (os.path.join(ROOT, 'zhgpt_jax', 'lm_tasks', 'zh_mc.yaml'),
              os.path.join(ROOT, 'zhgpt_jax', 'lm_tasks', 'functions.py'),
              os.path.join(tasks['path'], 'zt_gen.yaml'), os.path.join(tasks['path'], 'zt_ppl.yaml')):
    shutil.copy(src, path)
  out = subprocess.run(
      [os.path.join(os.path.dirname(sys.executable), 'lm_eval'), '--model', 'local-completions',
       '--model_args', f'model=model,base_url={server.url}/v1/completions,tokenizer={model[1]},'
       'tokenizer_backend=huggingface,max_length=64,num_concurrent=8,max_retries=1',
       '--tasks', TASKS, '--include_path', str(path), '--num_fewshot', '1',
       '--metadata', f'{{"data_dir": "{tasks["data"]}"}}', '--output_path',
       str(tmp_path / 'out'), '--log_samples'],
      env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert_same_as_hf(read_samples(str(tmp_path / 'out')), hf_samples,
                    read_results(str(tmp_path / 'out')), hf_results)
