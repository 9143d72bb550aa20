"""`main.py serve` over HTTP, with the official openai client, against `main.py sample`.

One server process for the module (tests/serving.py: a random-weight tiny model saved
through the real checkpoint code, an API key from $ZHGPT_API_KEY, a small body limit). The
references are sample.py's functions on the same checkpoint, in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
import transformers

from serving import API_KEY, ROOT, Served, get, random_workdir
from zhgpt_jax import chatml, checkpoint, engine, pretrained, sample, serve
from zhgpt_jax import tokenizer as tok_lib

pytestmark = pytest.mark.slow  # end-to-end: runs, servers, kill trials (minutes); CI runs them

MAX_BODY = 20_000
PROMPTS = [f'{a}{b}' for a in ('村民们', '今天', '人民', '我们的', '经济', '中国', '学生', '城市')
           for b in ('都很高兴', '发展', '说', '的生活', '正在', '和', '新的', '开始')]   # 64


@pytest.fixture(scope='module')
def workdir(tiny_data, tmp_path_factory):
  return random_workdir(tiny_data.config, os.path.join(tiny_data.data_dir, 'tokenizer'),
                        str(tmp_path_factory.mktemp('serve') / 'model'))


@pytest.fixture(scope='module')
def server(workdir):
  s = Served(workdir, f'--config.serve.max_request_bytes={MAX_BODY}',
             env={serve.API_KEY_ENV: API_KEY})
  yield s
  s.close()


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=f'{server.url}/v1', api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope='module')
def reference(workdir):
  """(cfg, params, tokenizer, config) of the served checkpoint, for sample.py's answers."""
  cfg, params, tokenizer, config, _ = checkpoint.load_model(workdir)
  config.sample.temperature = 0.0
  return cfg, params, tokenizer, config


def stop_ids(tokenizer):
  return list(tok_lib.special_ids(tokenizer).stop)


def complete(client, prompt, **kw):
  return client.completions.create(model='model', prompt=prompt, temperature=0, **kw)


# ---------------------------------------------------------------- the API against sample.py

def test_models_health_and_page(server, client):
  assert [m.id for m in client.models.list().data] == ['model']
  status, body = get(f'{server.url}/health')
  # Compiled at start: a prefill per (rows, prompt bucket): 1 x (16, 32, 64, 128) and
  # 4 x 16; a decode chunk per batch size 1, 4, 16.
  assert status == 200 and json.loads(body) == dict(status='ok', model='model', slots=16,
                                                    active=0, waiting=0,
                                                    compiled=dict(prefill=5, decode=3))
  status, body = get(f'{server.url}/')
  assert status == 200 and b'/v1/chat/completions' in body and b'<script' in body
  assert b'http://' not in body and b'https://' not in body       # no external assets


def test_completions_greedy_equal_main_py_sample(server, client, reference, workdir):
  cfg, params, tokenizer, config = reference
  # One prompt at a time: a batch shares one cap on new tokens, what the longest prompt leaves.
  want = [sample.generate_text(cfg, params, tokenizer, [p], config.sample)[0] for p in PROMPTS[:6]]
  got = [complete(client, p) for p in PROMPTS[:6]]
  assert [c.choices[0].text for c in got] == want
  assert len(set(want)) == 6 and all(len(w) > 5 for w in want)
  for c, p in zip(got, PROMPTS):
    ids = tokenizer.encode(p).ids
    assert c.usage.prompt_tokens == len(ids) and c.object == 'text_completion'
    assert c.choices[0].finish_reason in ('stop', 'length')
  # The command line itself, streaming one prompt.
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), 'sample', '--workdir',
                        workdir, '--prompt', PROMPTS[0], '--config.sample.temperature=0'],
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout == PROMPTS[0] + got[0].choices[0].text + '\n'
  # Token ids as the prompt: the same reply as their text.
  ids = tokenizer.encode(PROMPTS[1]).ids
  assert complete(client, ids).choices[0].text == want[1]


def test_chat_prompt_ids_equal_apply_chat_template(tiny_data, client, reference):
  messages = [dict(role='system', content='你是一个乐于助人的助手。'),
              dict(role='user', content='你好，今天 天气 怎么样?\n请回答。'),
              dict(role='assistant', content='今天天气很好。 Sunny!'),
              dict(role='user', content='明天呢？')]
  hf = transformers.AutoTokenizer.from_pretrained(os.path.join(tiny_data.data_dir, 'tokenizer'))
  want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  want = list(want['input_ids'] if hasattr(want, 'keys') else want)   # transformers 4 | 5
  got = serve.chat_prompt_ids(chatml.ChatEncoder(reference[2]), messages)
  assert got == want
  reply = client.chat.completions.create(model='model', messages=messages, max_tokens=3)
  assert reply.usage.prompt_tokens == len(want)


def test_chat_greedy_stream_and_usage(client, reference):
  cfg, params, tokenizer, config = reference
  messages = [dict(role='user', content='村民们都很高兴吗？')]
  ids = serve.chat_prompt_ids(chatml.ChatEncoder(tokenizer), messages)
  new = sample.generate(cfg, params, [ids], max_new_tokens=40, temperature=0.0,
                        repetition_penalty=config.sample.repetition_penalty,
                        stop_ids=stop_ids(tokenizer))[0]
  want = tok_lib.decode(tokenizer, new)
  reply = client.chat.completions.create(model='model', messages=messages, temperature=0,
                                         max_tokens=40)
  choice = reply.choices[0]
  assert choice.message.role == 'assistant' and choice.message.content == want
  assert choice.finish_reason == ('length' if len(new) == 40 else 'stop')
  assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), len(new))
  chunks = list(client.chat.completions.create(
      model='model', messages=messages, temperature=0, max_tokens=40, stream=True,
      stream_options=dict(include_usage=True)))
  assert chunks[0].choices[0].delta.role == 'assistant'
  pieces = [c.choices[0].delta.content or '' for c in chunks if c.choices]
  assert ''.join(pieces) == want and sum(bool(p) for p in pieces) > 2   # several pieces
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
  assert chunks[-1].usage.completion_tokens == len(new) and not chunks[-1].choices


def test_stop_max_tokens_and_seed(client, reference):
  cfg, params, tokenizer, config = reference
  full = complete(client, PROMPTS[2], max_tokens=30).choices[0].text
  stop = next(full[i:i + 2] for i in range(3, len(full)) if '\ufffd' not in full[i:i + 2])
  got = complete(client, PROMPTS[2], max_tokens=30, stop=['never-there', stop])
  assert got.choices[0].text == full[:full.index(stop)] and got.choices[0].finish_reason == 'stop'
  streamed = list(complete(client, PROMPTS[2], max_tokens=30, stop=stop, stream=True))
  assert ''.join(c.choices[0].text for c in streamed) == full[:full.index(stop)]
  short = complete(client, PROMPTS[2], max_tokens=5)
  assert short.choices[0].finish_reason == 'length' and short.usage.completion_tokens == 5
  # Sampling: a seed reproduces, and samples what sample.generate samples with it.
  options = dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=20)
  first, again, other = (client.completions.create(model='model', prompt=PROMPTS[3], **o).choices[0].text
                         for o in (options, options, dict(options, seed=8)))
  ids = tokenizer.encode(PROMPTS[3]).ids
  new = sample.generate(cfg, params, [ids], max_new_tokens=20, temperature=1.0, top_p=0.9,
                        top_k=config.sample.top_k, seed=7,
                        repetition_penalty=config.sample.repetition_penalty,
                        stop_ids=stop_ids(tokenizer))[0]
  assert first == again == tok_lib.decode(tokenizer, new) and first != other


# ---------------------------------------------------------------- concurrency

def test_sixteen_clients_match_each_request_alone(client):
  alone = {p: complete(client, p, max_tokens=16).choices[0].text for p in PROMPTS}
  got, errors = {}, []

  def worker(mine):
    try:
      for p in mine:
        got[p] = complete(client, p, max_tokens=16).choices[0].text
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(PROMPTS[i::16],)) for i in range(16)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and got == alone
  assert len(set(alone.values())) > 50


def test_a_client_killed_mid_stream_does_not_stall_others(server, client):
  code = ('import openai,sys\n'
          f'c = openai.OpenAI(base_url="{server.url}/v1", api_key="{API_KEY}")\n'
          f's = c.completions.create(model="model", prompt="{PROMPTS[0]}", max_tokens=100, '
          'temperature=0, stream=True)\n'
          'for chunk in s:\n  print("got", flush=True)\n')
  killed = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
  others = {}
  threads = [threading.Thread(target=lambda p=p: others.__setitem__(
      p, complete(client, p, max_tokens=16).choices[0].text)) for p in PROMPTS[8:16]]
  assert killed.stdout.readline() == 'got\n'
  for t in threads:
    t.start()
  killed.kill()
  killed.wait()
  for t in threads:
    t.join(timeout=60)
  assert len(others) == 8 and all(others.values())
  deadline = time.time() + 20
  while json.loads(get(f'{server.url}/health')[1])['active'] and time.time() < deadline:
    time.sleep(0.1)
  assert json.loads(get(f'{server.url}/health')[1])['active'] == 0
  assert complete(client, PROMPTS[8], max_tokens=16).choices[0].text == others[PROMPTS[8]]
  # Non-streaming clients that hang up right after sending.
  body = json.dumps(dict(model='model', prompt=PROMPTS[9], max_tokens=100)).encode()
  for _ in range(3):
    with socket.create_connection(('127.0.0.1', server.port)) as s:
      s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                b'Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s'
                % (API_KEY.encode(), len(body), body))
  assert complete(client, PROMPTS[8], max_tokens=16).choices[0].text == others[PROMPTS[8]]


def test_engine_cancel_frees_the_slot_for_the_next_request(reference):
  """One slot: a request cancelled after its first tokens hands the slot to a waiting one."""
  cfg, params, _, _ = reference
  eng = engine.Engine(cfg, params, slots=1, chunk=2, stop_ids=[])
  events = {'a': [], 'b': []}
  done = threading.Event()

  def on_a(ids, finish):
    events['a'].append((ids, finish))
    if len(events['a']) == 1:
      eng.cancel(a)

  def on_b(ids, finish):
    events['b'].append((ids, finish))
    if finish:
      done.set()

  a = engine.Request([5, 6, 7], 100, on_a)
  try:
    eng.submit(a)
    eng.submit(engine.Request([8, 9], 5, on_b))
    assert done.wait(120)
  finally:
    eng.close()
  assert events['a'][-1] == ([], 'cancelled')
  assert sum(len(ids) for ids, _ in events['a']) < 20
  assert sum(len(ids) for ids, _ in events['b']) == 5 and events['b'][-1][1] == 'length'


def test_engine_steps_once_after_a_join_while_slots_are_free(reference):
  """A request that joins while slots stay free is followed by a one-step decode call (more
  may be arriving: they wait for a shorter call); with no free slot, and once no one joins,
  calls run the whole chunk. The tokens are the same either way."""
  cfg, params, _, _ = reference

  def deliveries(slots):
    eng = engine.Engine(cfg, params, slots=slots, chunk=4, stop_ids=[])
    calls, done = [], threading.Event()

    def on_tokens(ids, finish):
      calls.append(list(ids))
      if finish:
        done.set()

    try:
      eng.submit(engine.Request([5, 6, 7], 11, on_tokens))
      assert done.wait(120)
    finally:
      eng.close()
    return calls

  free, full = deliveries(4), deliveries(1)
  assert [len(c) for c in free] == [1, 1, 4, 4, 1]   # prefill, one step, then chunks
  assert [len(c) for c in full] == [1, 4, 4, 2]
  assert sum(free, []) == sum(full, [])


def test_engine_serves_moe_with_ragged_dot_experts():
  """An MoE model whose experts run through ragged_dot (the GPU default; it has no vmap rule):
  the engine's replies equal sample.generate's."""
  import jax
  from helpers import tiny_cfg
  from zhgpt_jax import model as model_lib
  cfg = tiny_cfg(mlp='moe', moe=dict(grouped='ragged_dot'))
  params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x,
                        model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  prompts = [[5, 17, 200, 3], [250, 1, 7]]
  want = [sample.generate(cfg, params, [p], max_new_tokens=6)[0] for p in prompts]
  got, done = [[], []], threading.Semaphore(0)
  eng = engine.Engine(cfg, params, slots=2, chunk=3, stop_ids=[])
  try:
    for i, p in enumerate(prompts):
      eng.submit(engine.Request(p, 6, lambda ids, finish, i=i: (
          got[i].extend(ids), finish and done.release())))
    assert done.acquire(timeout=120) and done.acquire(timeout=120)
  finally:
    eng.close()
  assert got == want and got[0] != got[1]


def test_deepseek_preset_serves_what_main_py_sample_writes(tiny_data, tmp_path):
  """configs/moe.py:deepseek (MLA, whose cache rows are its latent and rotary key; the
  sigmoid MoE with its routing bias) through `main.py serve`: greedy replies equal sample.py's
  (what `main.py sample` prints), one request at a time and three at once."""
  from configs import moe as moe_configs
  config = moe_configs.get_config('deepseek')
  config.data.cache_dir = tiny_data.data_dir
  workdir = random_workdir(config, os.path.join(tiny_data.data_dir, 'tokenizer'),
                           str(tmp_path / 'model'))
  cfg, params, tokenizer, config, _ = checkpoint.load_model(workdir)
  assert cfg.attention_kind == 'mla' and cfg.mlp == 'moe'
  config.sample.update(temperature=0.0, max_new_tokens=12)
  want = [sample.generate_text(cfg, params, tokenizer, [p], config.sample)[0] for p in PROMPTS[:3]]
  assert len(set(want)) == 3 and all(len(w) > 3 for w in want)
  server = Served(workdir, '--config.serve.slots=4')   # 3 at once: decode batches of 1 and 4
  try:
    client = openai.OpenAI(base_url=f'{server.url}/v1', api_key='none', max_retries=0, timeout=60)
    got = [complete(client, p, max_tokens=12).choices[0].text for p in PROMPTS[:3]]
    together = [None] * 3
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(
        i, complete(client, PROMPTS[i], max_tokens=12).choices[0].text)) for i in range(3)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(120)
  finally:
    server.close()
  assert got == want and together == want


def test_engine_logprobs_and_scoring_requests():
  """Logprobs of generated tokens and scored prompts are the model's log-softmax; scoring-only
  requests take no slot, so they finish while the one slot is busy decoding."""
  import jax
  import numpy as np
  from helpers import tiny_cfg
  from zhgpt_jax import model as model_lib
  cfg = tiny_cfg()
  params = jax.tree.map(lambda x: x * 8 if x.ndim > 1 else x,
                        model_lib.init_params(cfg, jax.random.PRNGKey(0)))
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, cfg.real_vocab_size, n).tolist() for n in (9, 3, 20, 14, 6, 30)]
  order, done = [], threading.Semaphore(0)
  finished = lambda name: lambda ids, finish: finish and (order.append(name), done.release())
  eng = engine.Engine(cfg, params, slots=1, chunk=2, stop_ids=[])
  gen = engine.Request(prompts[0], 30, finished('gen'), logprobs=True, top_logprobs=3,
                       prompt_logprobs=True)
  got = []
  gen.on_tokens = lambda ids, finish, f=gen.on_tokens: (got.extend(ids), f(ids, finish))
  scored = [engine.Request(p, 0, finished(i), prompt_logprobs=True, top_logprobs=2)
            for i, p in enumerate(prompts[1:])]
  try:
    eng.submit(gen)
    for r in scored:
      eng.submit(r)
    for _ in range(1 + len(scored)):
      assert done.acquire(timeout=120)
    with pytest.raises(ValueError):
      eng.submit(engine.Request(prompts[0], 0, finished('nothing')))
  finally:
    eng.close()
  assert order[-1] == 'gen' and sorted(order[:-1]) == list(range(len(scored)))
  assert got == sample.generate(cfg, params, [prompts[0]], max_new_tokens=30)[0]

  # The softmax over the whole padded vocabulary (the model's, as exported); padding ids are
  # never a top alternative.
  forward = jax.jit(lambda x: jax.nn.log_softmax(
      model_lib.GPT(cfg).apply({'params': params}, x)[0][0]))

  def log_softmax(ids):   # one program: causal, so the pad after `ids` changes nothing
    return np.asarray(forward(np.array([ids + [0] * (cfg.seq_len - len(ids))])))

  real = lambda x: np.where(np.arange(x.shape[-1]) < cfg.real_vocab_size, x, -np.inf)

  full = prompts[0] + got
  want = log_softmax(full)
  assert gen.prompt_scores[0] is None and len(gen.prompt_scores) == len(prompts[0])
  lps = [s[0] for s in gen.prompt_scores[1:]] + gen.token_logprobs
  np.testing.assert_allclose(lps, [want[i, full[i + 1]] for i in range(len(full) - 1)],
                             atol=1e-4)
  for i, (ids, lp) in enumerate(map(lambda t: zip(*t), gen.top)):   # greedy: the top-1 is it
    j = len(prompts[0]) - 1 + i
    assert ids[0] == full[j + 1] and list(ids) == list(np.argsort(-real(want[j]))[:3])
    np.testing.assert_allclose(lp, np.sort(real(want[j]))[::-1][:3], atol=1e-4)
  for r in scored:
    want = log_softmax(r.prompt)
    assert len(r.prompt_scores) == len(r.prompt) and r.token_logprobs == []
    for j, (lp, best, top) in enumerate(r.prompt_scores[1:]):
      np.testing.assert_allclose(lp, want[j, r.prompt[j + 1]], atol=1e-4)
      assert best == (np.argmax(real(want[j])) == r.prompt[j + 1])
      assert [t for t, _ in top] == list(np.argsort(-real(want[j]))[:2])


# ---------------------------------------------------------------- bad requests

def post(server, path, body, key=API_KEY, content_type='application/json'):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  headers = {'Content-Type': content_type}
  if key:
    headers['Authorization'] = f'Bearer {key}'
  req = urllib.request.Request(f'{server.url}{path}', data=data, headers=headers)
  try:
    with urllib.request.urlopen(req, timeout=30) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


CHAT = dict(model='model', messages=[dict(role='user', content='你好')], max_tokens=4)
BAD = {
    'malformed JSON': ('/v1/chat/completions', b'{"model": "model", "messages": [', 400),
    'not an object': ('/v1/chat/completions', b'[1, 2]', 400),
    'unknown model': ('/v1/chat/completions', dict(CHAT, model='gpt-4'), 404),
    'missing messages': ('/v1/chat/completions', dict(model='model'), 400),
    'empty messages': ('/v1/chat/completions', dict(CHAT, messages=[]), 400),
    'wrong role': ('/v1/chat/completions',
                   dict(CHAT, messages=[dict(role='robot', content='hi')]), 400),
    'content not text': ('/v1/chat/completions',
                         dict(CHAT, messages=[dict(role='user', content=5)]), 400),
    'negative max_tokens': ('/v1/chat/completions', dict(CHAT, max_tokens=-1), 400),
    'zero max_tokens': ('/v1/completions', dict(model='model', prompt='a', max_tokens=0), 400),
    'max_tokens past the context': ('/v1/chat/completions', dict(CHAT, max_tokens=1000), 400),
    'prompt longer than the context': ('/v1/completions',
                                       dict(model='model', prompt='人民' * 200), 400),
    'oversized body': ('/v1/completions', dict(model='model', prompt='x' * MAX_BODY), 413),
    'temperature a string': ('/v1/chat/completions', dict(CHAT, temperature='hot'), 400),
    'top_p above 1': ('/v1/chat/completions', dict(CHAT, top_p=1.5), 400),
    'n=2': ('/v1/chat/completions', dict(CHAT, n=2), 400),
    'five stop strings': ('/v1/completions', dict(model='model', prompt='a', stop=list('abcde')),
                          400),
    'token id outside the vocab': ('/v1/completions', dict(model='model', prompt=[5, 10**6]), 400),
    'top_logprobs without logprobs': ('/v1/chat/completions', dict(CHAT, top_logprobs=2), 400),
}


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client):
  for name, (path, body, status) in BAD.items():
    got, reply = post(server, path, body)
    assert got == status, (name, reply)
    assert set(reply) == {'error'} and reply['error']['message'], (name, reply)
    assert {'type', 'param', 'code'} <= set(reply['error']), (name, reply)
  assert post(server, '/v1/completions', dict(model='model', prompt='人民' * 200))[1][
      'error']['code'] == 'context_length_exceeded'
  for key in (None, 'wrong'):
    got, reply = post(server, '/v1/chat/completions', CHAT, key=key)
    assert got == 401 and reply['error']['code'] == 'invalid_api_key'
  assert get(f'{server.url}/v1/models')[0] == 401
  assert get(f'{server.url}/v1/nowhere', API_KEY)[0] == 404
  assert get(f'{server.url}/health')[0] == 200          # open without the key
  reply = client.chat.completions.create(**CHAT)
  assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0


# ---------------------------------------------------------------- the chat page, in a browser

@pytest.mark.browser
def test_chat_page_in_chromium(server, client, tmp_path):
  """Two turns typed into the page in headless chromium: each reply streams in and equals the
  API's greedy reply to the conversation so far; the page keeps the history."""
  from serving import chat_in_page, chromium, refused_turn
  try:
    driver = chromium(str(tmp_path / 'chromium-profile'))
  except FileNotFoundError as e:
    if os.environ.get('CI') == 'true':
      raise
    pytest.skip(str(e))
  try:
    got = chat_in_page(driver, server.url, ['你好', '村民们都很高兴吗？'], api_key=API_KEY,
                       max_tokens=16)
    # README's docs/chat-page.png is this screenshot (ZHGPT_SCREENSHOT=docs/chat-page.png).
    shot = os.environ.get('ZHGPT_SCREENSHOT') or str(tmp_path / 'page.png')
    assert driver.save_screenshot(shot)
    with open(shot, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    # A refused turn (max tokens past the context): the error shows, the turn is taken back
    # and its text returned to the input box.
    refused = refused_turn(driver, '再来一次', max_tokens=5000)
  finally:
    driver.quit()
  assert refused['bubbles'] == got['bubbles'] + [('error', refused['bubbles'][-1][1])]
  assert 'max_tokens=5000 is too large' in refused['bubbles'][-1][1]
  assert refused['input'] == '再来一次' and refused['history'] == got['history']
  turns = [dict(role=r, content=t) for r, t in got['bubbles']]
  assert [t['role'] for t in turns] == ['user', 'assistant'] * 2
  assert [turns[0]['content'], turns[2]['content']] == ['你好', '村民们都很高兴吗？']
  assert got['history'] == turns
  for i in (1, 3):
    want = client.chat.completions.create(model='model', messages=turns[:i], temperature=0,
                                          max_tokens=16).choices[0].message.content
    assert turns[i]['content'] == want and want
  # Streamed: each reply was built from several pieces, and the page showed only prefixes of it
  # on the way (how many it painted depends on how the pieces arrive).
  assert all(n >= 2 for n in got['pieces']), got['pieces']
  for i, texts in zip((1, 3), got['partials']):
    assert texts and texts[-1] == turns[i]['content'], texts
    assert all(turns[i]['content'].startswith(t) for t in texts), texts


# ---------------------------------------------------------------- README, flags, hf: directories

def readme_serving_examples() -> tuple[str, list[str]]:
  """The README's openai-client example (python) and its curl command lines."""
  import re
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  python = next(b for b in re.findall(r'```python\n(.*?)```', text, re.S) if 'from openai' in b)
  curls = [line for b in re.findall(r'```bash\n(.*?)```', text, re.S)
           for line in b.splitlines() if line.startswith('curl ')]
  return python, curls


def test_readme_examples(server, capsys):
  """The README's openai-client and curl examples, pointed at the test server."""
  here = lambda s: (s.replace('127.0.0.1:8000', f'127.0.0.1:{server.port}')
                    .replace("'sft'", "'model'").replace('"sft"', '"model"')
                    .replace("'SECRET'", repr(API_KEY)))
  python, curls = readme_serving_examples()
  assert len(curls) == 2
  exec(compile(here(python), 'README.md', 'exec'), {})   # pylint: disable=exec-used
  assert len(capsys.readouterr().out) > 5
  import shutil
  if not shutil.which('curl'):
    if os.environ.get('CI') == 'true':
      raise AssertionError('curl is not installed (.ci/run installs it)')
    pytest.skip('curl is not installed')
  outs = [subprocess.run(['bash', '-c', here(c)], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, ZHGPT_API_KEY=API_KEY)) for c in curls]
  assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
  assert json.loads(outs[0].stdout)['usage']['completion_tokens'] > 0
  events = [e for e in outs[1].stdout.split('\n\n') if e]
  assert events[-1] == 'data: [DONE]' and len(events) > 2
  assert json.loads(events[-2][len('data: '):])['choices'][0]['finish_reason']


def test_serve_flags_and_hf_directory(workdir, reference, tmp_path):
  """The README's flags are parsed and checked before any loading (one line, exit 2), also for
  a run saved before `serve` existed; an exported HF directory (`--workdir hf:DIR`) loads as
  the same model and tokenizer."""
  def main_py(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), 'serve', *args],
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'),
                          capture_output=True, text=True, timeout=120)
  out = main_py('--workdir', workdir, '--host', '0.0.0.0', '--port', '70000', '--api_key', 'SECRET',
                '--config.serve.slots=32')
  assert (out.returncode, out.stderr) == (2, 'main.py: error: --port 70000: must be in 1..65535\n')
  # A run saved before `serve` (or another key) existed takes the defaults of what it lacks.
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    saved = json.load(f)
  del saved['serve'], saved['data']['val_fraction']
  (tmp_path / 'old').mkdir()
  (tmp_path / 'old' / 'config.json').write_text(json.dumps(saved), encoding='utf-8')
  out = main_py('--workdir', str(tmp_path / 'old'), '--config.serve.slots=0')
  assert (out.returncode, out.stderr) == (2, 'main.py: error: config.serve.slots=0: must be > 0\n')
  from zhgpt_jax import export
  hf_dir = export.export_workdir(workdir, str(tmp_path / 'hf'))
  cfg, params, tokenizer, model_id = pretrained.load_source(f'hf:{hf_dir}')
  want_cfg, want_params, want_tok, _ = reference
  assert model_id == 'hf' and cfg.real_vocab_size == want_cfg.real_vocab_size
  assert tokenizer.get_vocab() == want_tok.get_vocab()
  import jax
  import numpy as np
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, want_params)
  # Requests' unset fields default to the directory's generation_config.json, save what the
  # command line set.
  with open(os.path.join(hf_dir, 'generation_config.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(do_sample=False, top_k=7, top_p=0.5, repetition_penalty=1.3), f)
  config = reference[3]
  got = serve.hf_sample_defaults(hf_dir, config.sample, explicit={'sample.top_p'})
  assert (got.temperature, got.top_k, got.top_p, got.repetition_penalty) == (
      0.0, 7, config.sample.top_p, 1.3)


def test_nothing_recompiled_after_every_request_above(server):
  """The module's requests (lengths, options, seeds, stops, cancels) compiled nothing new,
  and none of them (bad ones, hang-ups included) raised inside the server."""
  health = json.loads(get(f'{server.url}/health')[1])
  assert health['compiled'] == dict(prefill=5, decode=3) and health['active'] == 0
  assert 'Traceback' not in server.output() and 'ERROR' not in server.output(), \
      server.output()[-3000:]
