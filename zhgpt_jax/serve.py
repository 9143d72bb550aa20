"""`main.py serve`: an OpenAI-compatible HTTP API and a chat page, on FastAPI + uvicorn.

  GET  /                     the chat page (static/chat.html: plain HTML + JS, no external assets)
  GET  /health               {"status": "ok", "slots", "active", "waiting", "compiled"}
  GET  /v1/models            the one model served
  POST /v1/chat/completions  messages -> ChatML prompt (the ids of HF apply_chat_template)
  POST /v1/completions       prompt text or token ids (or a list of them: a choice each) ->
                             continuation; echo, logprobs, max_tokens=0 (the prompt's scores)

Both POST endpoints take max_tokens, temperature, top_p, stop, seed, n=1, stream (server-sent
events ending in `data: [DONE]`) and our extras top_k and repetition_penalty; a field left
out takes config.sample's value (seed: a random one). Requests run in engine.Engine's batch
slots. Replies decode with the tokenizer's special tokens kept, as `main.py sample` prints
them; a `stop` string ends the reply before it (held back while it may still be forming).
A client that disconnects cancels its request, which frees its slot.

Log-probabilities are the raw model's (before penalty, temperature and filters), kept by the
engine as it runs the request: completions' `logprobs=N` (with `echo`, the prompt's too: a
prefill whose logits are kept), chat's `logprobs: true` + `top_logprobs` (logprobs.py
shapes them). Not with stream.

With an API key (--api_key or $ZHGPT_API_KEY) every /v1 request needs
`Authorization: Bearer KEY` (401 otherwise). Errors are OpenAI's JSON shape (api_schema.py).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import os
import secrets
import socket
import sys
import time
import uuid
from importlib import resources

import fastapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from zhgpt_jax import api_schema as api
from zhgpt_jax import chatml
from zhgpt_jax import engine as engine_lib
from zhgpt_jax import logprobs as logprobs_lib
from zhgpt_jax import sample
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.api_schema import ApiError
from zhgpt_jax.config import UserError

API_KEY_ENV = 'ZHGPT_API_KEY'


def chat_page() -> str:
  return resources.files('zhgpt_jax').joinpath('static/chat.html').read_text(encoding='utf-8')


def chat_prompt_ids(encoder, messages: list[dict]) -> list[int]:
  """The ChatML prompt of `messages` ({'role', 'content'}), ending in the assistant header:
  HF apply_chat_template(messages, add_generation_prompt=True) with the tokenizer's template.
  ('developer' is OpenAI's newer name for 'system'.)"""
  return encoder.prompt([dict(role='system' if m['role'] == 'developer' else m['role'],
                              content=m['content']) for m in messages])


class ReplyText:
  """A reply's text as its ids arrive: whole characters, cut before the first `stop` string."""

  def __init__(self, tokenizer, stop: list[str]):
    self.tokenizer, self.stop = tokenizer, stop
    self.ids: list[int] = []
    self.sent = 0
    self.stopped = False

  def feed(self, ids: list[int], final: bool) -> str:
    """The new text that is safe to send; at a stop string, the text before it (stopped)."""
    self.ids += ids
    text = tok_lib.decode(self.tokenizer, self.ids)
    hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
    if hits:
      self.stopped, text = True, text[:min(hits)]
    elif not final:
      text = sample.complete_suffix(text, 0)
      # Hold back a tail that may grow into a stop string.
      hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                 default=0)
      text = text[:len(text) - hold]
    piece = text[self.sent:]
    self.sent = max(self.sent, len(text))
    return piece


class Server:
  """The model, its tokenizer, and the engine that runs requests."""

  def __init__(self, cfg, params, tokenizer, sample_cfg, *, model_id: str, slots: int,
               chunk: int, max_request_bytes: int, prefill_rows: int = 4):
    self.cfg, self.tokenizer, self.sample_cfg, self.model_id = cfg, tokenizer, sample_cfg, model_id
    # A tokenizer without ChatML (a stock HF one) serves completions only.
    self.encoder = chatml.ChatEncoder(tokenizer) if tok_lib.has_chatml(tokenizer) else None
    self.max_request_bytes = max_request_bytes
    self.engine = engine_lib.Engine(cfg, params, slots=slots, chunk=chunk,
                                    stop_ids=list(tok_lib.special_ids(tokenizer).stop),
                                    prefill_rows=prefill_rows)
    self.created = int(time.time())

  def chat_ids(self, messages: list[api.Message]) -> list[int]:
    if self.encoder is None:
      raise ApiError(400, f'{self.model_id} has no chat template (its tokenizer lacks the ChatML '
                     'tokens): use /v1/completions', 'messages', 'chat_not_supported')
    return chat_prompt_ids(self.encoder, [dict(role=m.role, content=m.text()) for m in messages])

  def completion_ids(self, prompt) -> list[int]:
    """The token ids of one prompt: a string, or token ids."""
    if isinstance(prompt, str):
      return sample.encode_prompt(self.tokenizer, prompt)
    bad = [t for t in prompt if not 0 <= t < self.cfg.real_vocab_size]
    if bad or not prompt:
      raise ApiError(400, f'prompt: token id {bad[0]} is outside the vocabulary' if bad
                     else 'prompt: no token ids', 'prompt')
    return list(prompt)

  def request(self, req: api.Sampling, prompt: list[int], max_tokens: int | None, *,
              logprobs: int | None = None, echo: bool = False):
    """An engine.Request for `prompt` with `req`'s options (config.sample's where unset).

    With `logprobs` (the top alternatives asked for) each generated token's raw
    log-probability is kept, and with `echo` too the prompt's (a prefill whose logits are
    kept); max_tokens=0 generates nothing. None when there is nothing to run (max_tokens=0,
    no logprobs).
    """
    if req.model != self.model_id:
      raise ApiError(404, f'the model {req.model!r} does not exist; this server has '
                     f'{self.model_id!r}', 'model', 'model_not_found')
    room = self.cfg.seq_len - len(prompt)
    if room < (max_tokens != 0):
      raise ApiError(400, f"the prompt's {len(prompt)} tokens fill the model's context of "
                     f'{self.cfg.seq_len} tokens', 'messages', 'context_length_exceeded')
    if max_tokens is not None and max_tokens > room:
      raise ApiError(400, f'max_tokens={max_tokens} is too large: the prompt takes '
                     f'{len(prompt)} of the context of {self.cfg.seq_len} tokens, leaving '
                     f'{room}', 'max_tokens', 'context_length_exceeded')
    if max_tokens == 0 and logprobs is None:
      return None
    s = self.sample_cfg
    pick = lambda value, default: default if value is None else value
    return engine_lib.Request(
        prompt, pick(max_tokens, min(s.max_new_tokens, room)), on_tokens=None,
        temperature=pick(req.temperature, s.temperature), top_k=pick(req.top_k, s.top_k),
        top_p=pick(req.top_p, s.top_p),
        repetition_penalty=pick(req.repetition_penalty, s.repetition_penalty),
        seed=pick(req.seed, secrets.randbits(31)), logprobs=logprobs is not None,
        top_logprobs=logprobs or 0, prompt_logprobs=echo and logprobs is not None)

  async def run(self, request: engine_lib.Request, stop: list[str]):
    """Submits `request`; yields (text piece, finish reason or None, the ReplyText so far).

    Leaving early (a client gone, a stop string) cancels the request, freeing its slot.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_tokens(ids, finish):
      try:
        loop.call_soon_threadsafe(queue.put_nowait, (ids, finish))
      except RuntimeError:   # the event loop is closed: the server is shutting down
        pass

    request.on_tokens = on_tokens
    text, finish = ReplyText(self.tokenizer, stop), None
    self.engine.submit(request)
    try:
      while finish is None:
        ids, finish = await queue.get()
        piece = text.feed(ids, final=finish is not None)
        if text.stopped:
          finish = 'stop'
        if finish == 'error':
          raise ApiError(500, 'decoding failed on the server', kind='server_error')
        if piece or finish:
          yield piece, finish, text
    finally:
      if finish is None or text.stopped:
        self.engine.cancel(request)


def _usage(prompt: list[int], text: ReplyText) -> dict:
  n = len(text.ids)
  return dict(prompt_tokens=len(prompt), completion_tokens=n, total_tokens=len(prompt) + n)


def _sse(obj) -> str:
  return f'data: {json.dumps(obj, ensure_ascii=False)}\n\n'


async def _body(request: fastapi.Request, limit: int) -> bytes:
  """The request body, refused (413) past `limit` bytes without reading the rest."""
  size = request.headers.get('content-length', '')
  if size.isdigit() and int(size) > limit:
    raise ApiError(413, f'the request body of {size} bytes is over the limit of {limit}',
                   code='request_too_large')
  body = bytearray()
  async for part in request.stream():
    body += part
    if len(body) > limit:
      raise ApiError(413, f'the request body is over the limit of {limit} bytes',
                     code='request_too_large')
  return bytes(body)


async def _until_disconnect(request: fastapi.Request) -> None:
  while (await request.receive())['type'] != 'http.disconnect':
    pass


async def _respond(request: fastapi.Request, server: Server, req, prompt: list[int],
                   max_tokens: int | None, kind: str):
  """Runs one request: a JSON reply, or (req.stream) an SSE stream. kind: 'chat' | 'text'."""
  top = (req.top_logprobs or 0) if kind == 'chat' and req.logprobs else None
  job = server.request(req, prompt, max_tokens, logprobs=top)
  stop = req.stops()
  rid = f'{"chatcmpl" if kind == "chat" else "cmpl"}-{uuid.uuid4().hex[:24]}'
  head = dict(id=rid, created=int(time.time()), model=server.model_id)

  def choice(piece, finish, delta):
    if kind == 'text':
      return dict(index=0, text=piece, logprobs=None, finish_reason=finish)
    return dict(index=0, finish_reason=finish, logprobs=None,
                **{'delta' if delta else 'message':
                   dict(content=piece) if delta else dict(role='assistant', content=piece)})

  if req.stream:
    obj = 'chat.completion.chunk' if kind == 'chat' else 'text_completion'
    usage = req.stream_options is not None and req.stream_options.include_usage

    async def events():
      if kind == 'chat':
        first = choice('', None, True)
        first['delta']['role'] = 'assistant'
        yield _sse(dict(head, object=obj, choices=[first]))
      try:
        async for piece, finish, text in server.run(job, stop):
          yield _sse(dict(head, object=obj, choices=[choice(piece, finish, True)]))
        if usage:
          yield _sse(dict(head, object=obj, choices=[], usage=_usage(prompt, text)))
      except ApiError as e:
        yield _sse(e.body())
      yield 'data: [DONE]\n\n'

    return StreamingResponse(events(), media_type='text/event-stream',
                             headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})

  results = await _collect(request, server, [job], stop)
  if results is None:
    return fastapi.Response(status_code=499)
  (reply, finish, text), = results
  obj = 'chat.completion' if kind == 'chat' else 'text_completion'
  body = choice(reply, finish, False)
  if top is not None:
    body['logprobs'] = logprobs_lib.chat(server.tokenizer, text.ids, job.token_logprobs,
                                         job.top, len(reply))
  return JSONResponse(dict(head, object=obj, choices=[body], usage=_usage(prompt, text)))


async def _collect(request: fastapi.Request, server: Server, jobs: list, stop: list[str]):
  """Runs `jobs` (engine requests; None: nothing to run) together: [(reply, finish,
  ReplyText)] in order, or None if the client went away (which cancels them)."""

  async def one(job):
    text, pieces, finish = ReplyText(server.tokenizer, stop), [], 'length'
    if job is not None:
      async for piece, finish, text in server.run(job, stop):
        pieces.append(piece)
    return ''.join(pieces), finish, text

  watch = asyncio.ensure_future(_until_disconnect(request))
  work = asyncio.ensure_future(asyncio.gather(*(one(j) for j in jobs)))
  try:
    await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
  finally:
    watch.cancel()
    gone = not work.done()
    if gone:   # the client went away: cancelling `work` cancels the requests
      work.cancel()
      work.add_done_callback(lambda f: f.cancelled() or f.exception())   # retrieved: no log
  return None if gone else work.result()


async def _complete(request: fastapi.Request, server: Server, req: api.CompletionRequest):
  """/v1/completions without stream: a choice a prompt, with echo and logprobs."""
  prompts = [server.completion_ids(p) for p in req.prompts()]
  jobs = [server.request(req, ids, req.max_tokens, logprobs=req.logprobs, echo=req.echo)
          for ids in prompts]
  results = await _collect(request, server, jobs, req.stops())
  if results is None:
    return fastapi.Response(status_code=499)
  choices, used = [], 0
  for i, (ids, job, (reply, finish, text)) in enumerate(zip(prompts, jobs, results)):
    echoed = tok_lib.decode(server.tokenizer, ids) if req.echo else ''
    choice = dict(index=i, text=echoed + reply, logprobs=None, finish_reason=finish)
    if req.logprobs is not None:
      choice['logprobs'] = logprobs_lib.completion(
          server.tokenizer, ids if req.echo else None, job.prompt_scores, text.ids,
          job.token_logprobs, job.top, len(echoed) + len(reply))
    choices.append(choice)
    used += len(text.ids)
  n_prompt = sum(map(len, prompts))
  return JSONResponse(dict(
      id=f'cmpl-{uuid.uuid4().hex[:24]}', object='text_completion', created=int(time.time()),
      model=server.model_id, choices=choices,
      usage=dict(prompt_tokens=n_prompt, completion_tokens=used, total_tokens=n_prompt + used)))


def create_app(server: Server, api_key: str | None = None) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title='zhgpt-jax', docs_url=None, redoc_url=None)

  @app.exception_handler(ApiError)
  async def api_error(_, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_, e: StarletteHTTPException):
    return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

  @app.exception_handler(Exception)
  async def server_error(_, e: Exception):   # a bug: its traceback goes to the log, too
    return JSONResponse(ApiError(500, f'internal server error ({type(e).__name__})',
                                 kind='server_error').body(), status_code=500)

  async def authorize(request: fastapi.Request):
    if api_key:
      given = request.headers.get('authorization', '')
      if not hmac.compare_digest(given.encode(), f'Bearer {api_key}'.encode()):
        raise ApiError(401, 'missing or wrong API key: send Authorization: Bearer KEY',
                       code='invalid_api_key')

  v1 = fastapi.APIRouter(prefix='/v1', dependencies=[fastapi.Depends(authorize)])

  @app.get('/', response_class=HTMLResponse)
  async def page():
    return chat_page()

  @app.get('/health')
  async def health():
    waiting = len(server.engine.waiting)
    return dict(status='ok', model=server.model_id, slots=len(server.engine.slots),
                active=server.engine.active(), waiting=waiting,
                compiled=server.engine.compiled())

  @v1.get('/models')
  async def models():
    return dict(object='list', data=[dict(id=server.model_id, object='model',
                                          created=server.created, owned_by='zhgpt-jax')])

  @v1.post('/chat/completions')
  async def chat_completions(request: fastapi.Request):
    req = api.parse(api.ChatRequest, await _body(request, server.max_request_bytes))
    prompt = server.chat_ids(req.messages)
    max_tokens = req.max_completion_tokens if req.max_tokens is None else req.max_tokens
    return await _respond(request, server, req, prompt, max_tokens, 'chat')

  @v1.post('/completions')
  async def completions(request: fastapi.Request):
    req = api.parse(api.CompletionRequest, await _body(request, server.max_request_bytes))
    if not req.stream:
      return await _complete(request, server, req)
    prompt = server.completion_ids(req.prompts()[0])
    return await _respond(request, server, req, prompt, req.max_tokens, 'text')

  app.include_router(v1)
  return app


def hf_sample_defaults(directory: str, sample_cfg, explicit=()):
  """`sample_cfg` with the sampling settings of `directory`/generation_config.json (what HF's
  generate would use: do_sample false = greedy, temperature, top_k, top_p,
  repetition_penalty), except the keys set on the command line (`explicit`: 'sample.top_k')."""
  path = os.path.join(directory, 'generation_config.json')
  try:
    with open(path, encoding='utf-8') as f:
      gen = json.load(f)
  except FileNotFoundError:
    return sample_cfg
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path}: {e}') from e
  out = sample_cfg.copy_and_resolve_references()
  for key in ('temperature', 'top_k', 'top_p', 'repetition_penalty'):
    if isinstance(gen.get(key), (int, float)) and f'sample.{key}' not in explicit:
      out[key] = type(out[key])(gen[key])
  if gen.get('do_sample') is False and 'sample.temperature' not in explicit:
    out.temperature = 0.0
  return out


def serve(source: str, config, *, host: str, port: int, api_key: str | None = None,
          step: int | None = None, explicit=()) -> None:
  """`main.py serve`: loads the model, compiles every program, then serves until Ctrl-C.

  For `hf:DIR`, unset fields of a request default to DIR's generation_config.json, where it
  has them, rather than config.sample's (command-line `--config.sample.*` still win).
  """
  import uvicorn
  api_key = api_key or os.environ.get(API_KEY_ENV) or None
  sock = listen_socket(host, port)   # held from here on: no one can take the port meanwhile
  try:
    _serve(source, config, sock, host, port, api_key, step, explicit, uvicorn)
  finally:
    sock.close()


def listen_socket(host: str, port: int) -> socket.socket:
  """A socket bound to host:port, before the slow start: a port in use (or refused, or an
  address this machine does not have) is one UserError line, and, bound, no other process
  can take the port between this check and serving. uvicorn serves on it (`sockets=`)."""
  if not 0 < port < 65536:
    raise UserError(f'--port {port}: must be in 1..65535')
  try:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
  except (socket.gaierror, UnicodeError) as e:
    raise UserError(f'--host {host}: not an address of this machine ({e})') from None
  sock = socket.socket(family, kind, proto)
  try:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does
    sock.bind(address)
  except OSError as e:
    sock.close()
    why = ('the port is in use (another server?); stop it or choose another --port'
           if e.errno == errno.EADDRINUSE else f'{e.strerror or e}')
    raise UserError(f'--host {host} --port {port}: cannot listen there: {why}') from None
  sock.set_inheritable(True)
  return sock


def _serve(source, config, sock, host, port, api_key, step, explicit, uvicorn) -> None:
  from zhgpt_jax import pretrained
  cfg, params, tokenizer, model_id = pretrained.load_source(source, step)
  sample_cfg = config.sample
  if source.startswith('hf:'):
    sample_cfg = hf_sample_defaults(source[3:], sample_cfg, explicit)
  s = config.serve
  server = Server(cfg, params, tokenizer, sample_cfg, model_id=model_id, slots=s.slots,
                  chunk=s.chunk, max_request_bytes=s.max_request_bytes,
                  prefill_rows=s.prefill_rows)
  t0 = time.time()
  try:
    programs = server.engine.warm_up()
  except engine_lib.WarmUpError as e:
    server.engine.close()
    raise UserError(f'serve: {e}; not serving (a model that cannot run its warm-up would '
                    'answer every request with an error)') from None
  print(f'serve: {model_id} ({cfg.seq_len}-token context), {s.slots} slots; compiled '
        f'{programs} programs (prefill shapes + decode batch sizes) in '
        f'{time.time() - t0:.1f}s', file=sys.stderr)
  print(f'serve: http://{host}:{port}/  (API: http://{host}:{port}/v1'
        f'{", key required" if api_key else ""})', file=sys.stderr, flush=True)
  try:
    uvicorn.Server(uvicorn.Config(create_app(server, api_key), log_level='warning',
                                  timeout_graceful_shutdown=2)).run(sockets=[sock])
  finally:
    server.engine.close()
