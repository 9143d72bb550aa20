"""Batched decoding for the server: concurrent requests share the decode steps of B slots.

The engine keeps one KV cache of B slots x S positions (S = the model's seq_len). A request
takes a free slot: its prompt is prefilled into that slot's cache row (one call, the prompt
padded to a power-of-two bucket) and its first token picked. Then every decode step feeds
each live slot's last token at that slot's own position and picks its next token with that
slot's own options (temperature, top-k, top-p, repetition penalty, seed). A slot frees when
its request ends (a stop id, its max_new_tokens, or `cancel`: e.g. a client that went away)
and the next waiting request takes it. Steps run `chunk` at a time in one jitted
while_loop, which returns early when a slot ends while requests wait for one.

One compiled shape set: a decode program and a prefill program per prompt bucket (16, 32,
... up to S), all fixed when the engine starts (`warm_up` compiles them); a request's
length and options are traced values and never recompile anything.

Pieces shared with sample.py (`main.py sample`): the cache forward pass is
`sample.model_call`, vmapped over slots so that each slot has its own cache index; tokens
are chosen by `sample.choose` with options a row each; a slot's random keys are
`sample.row_keys(PRNGKey(seed), step, 1)`, the keys of a single prompt there. So a greedy
reply is `main.py sample`'s greedy continuation of the same ids, and a seeded one samples
what it samples with that seed.

Shape letters: B slots (the batch of the cache), S cache positions, P prompt bucket, V vocab
(padded), C decode steps of a chunk.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zhgpt_jax import model as model_lib
from zhgpt_jax import sample

GREEDY = sample.Mode(greedy=True, filters=False)
SAMPLED = sample.Mode(greedy=False, filters=False)
FILTERED = sample.Mode(greedy=False, filters=True)
FINISH = {1: 'stop', 2: 'length'}   # the codes rows['finish'] holds; 0 = still running


# ---------------------------------------------------------------- device side (jitted)

def _row_call(cfg, params, tok, position, row_cache):
  """sample.model_call for one slot: its last token at its position, its own cache index."""
  if cfg.mlp == 'moe':
    # ragged_dot has no vmap rule; for one token a row, fixed blocks never drop (capacity 0).
    cfg = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, grouped='capacity', capacity_factor=0.0))
  cache = [_rows(c, lambda x: x[None]) for c in row_cache]
  size = _cache_size(row_cache, 0)
  logits_1x1xV, cache = sample.model_call(
      cfg, params, tok[None, None], position[None, None], cache, jnp.ones((1, size), bool))
  return logits_1x1xV[0, 0], [_rows(c, lambda x: x[0]) for c in cache]


def _rows(layer_cache: dict, fn) -> dict:
  """A layer's cache with `fn` applied to each of its arrays (whatever the attention kind
  keeps: k/v, or MLA's latent and rotary key); its 'index' as it is."""
  return {name: x if name == 'index' else fn(x) for name, x in layer_cache.items()}


def _cache_size(cache: list[dict], axis: int) -> int:
  """Cache slots a row (`axis`: the slot axis of the arrays)."""
  return next(x.shape[axis] for name, x in cache[0].items() if name != 'index')


def _choose(cfg, logits_BxV, rows: dict):
  """Each row's next token with its own options; greedy where its temperature is 0."""
  t_Rx1 = rows['temperature'][:, None]
  opts = dict(penalty=rows['penalty'][:, None], temperature=jnp.where(t_Rx1 > 0, t_Rx1, 1.0),
              top_k=rows['top_k'][:, None], top_p=rows['top_p'][:, None])
  keys_B = jax.vmap(lambda key, step: sample.row_keys(key, step, 1)[0])(
      rows['key'], rows['length'])
  args = (logits_BxV, rows['seen'], opts, keys_B)
  greedy_B = sample.choose(cfg, GREEDY, *args)
  # Only what a live row asks for runs: no sampling when all are greedy, no sort without
  # a top-k/top-p cut.
  sampling_B = rows['live'] & (rows['temperature'] > 0)
  filters = jnp.any(sampling_B & ((rows['top_k'] > 0) | (rows['top_p'] < 1.0)))
  sampled = lambda: jax.lax.cond(filters, lambda: sample.choose(cfg, FILTERED, *args),
                                 lambda: sample.choose(cfg, SAMPLED, *args))
  sampled_B = jax.lax.cond(jnp.any(sampling_B), sampled, lambda: greedy_B)
  return jnp.where(rows['temperature'] > 0, sampled_B, greedy_B)


def _commit(rows: dict, tok_B, stops) -> tuple[dict, jax.Array]:
  """Records each live row's pick: (rows, which rows emitted a token). As sample._append."""
  live_B = rows['live']
  stop_B = live_B & jnp.any(tok_B[:, None] == stops[None, :], axis=-1)
  emit_B = live_B & ~stop_B
  length_B = rows['length'] + emit_B
  done_B = live_B & (stop_B | (length_B >= rows['max_new']))
  return dict(
      rows, last=jnp.where(live_B, tok_B, rows['last']), length=length_B,
      seen=rows['seen'].at[jnp.arange(tok_B.shape[0]), tok_B].set(True),
      live=live_B & ~done_B, finish=jnp.where(done_B, jnp.where(stop_B, 1, 2), rows['finish'])
  ), emit_B


@functools.partial(jax.jit, static_argnames=('cfg',), donate_argnames=('state',))
def _prefill(cfg, params, state: dict, slot, prompt_P, length, options: dict, stops):
  """Fills `slot`'s cache row with the prompt (its first `length` of P ids) and picks a token.

  `options` holds the slot's max_new, temperature, top_k, top_p, penalty ([1]) and key
  ([1, 2]). Returns (state, the token, whether it was emitted, the slot's finish code).
  """
  p = prompt_P.shape[0]
  cache = [dict(_rows(c, lambda x: jax.lax.dynamic_index_in_dim(x, slot, keepdims=True)),
                index=jnp.int32(0)) for c in state['cache']]
  size = _cache_size(cache, 1)
  # The pad after the prompt is causally invisible to it; decoding overwrites its slots.
  logits_1xPxV, cache = sample.model_call(cfg, params, prompt_P[None], jnp.arange(p)[None],
                                          cache, jnp.ones((1, size), bool))
  seen_ids_P = jnp.where(jnp.arange(p) < length, prompt_P, cfg.vocab_size)
  row = dict(options, last=jnp.zeros(1, jnp.int32), live=jnp.ones(1, bool),
             length=jnp.zeros(1, jnp.int32), finish=jnp.zeros(1, jnp.int32),
             seen=jnp.zeros((1, cfg.vocab_size), bool).at[0, seen_ids_P].set(True, mode='drop'))
  logits_1xV = jax.lax.dynamic_index_in_dim(logits_1xPxV[0], length - 1, keepdims=True)
  row, emit_1 = _commit(row, _choose(cfg, logits_1xV, row), stops)
  rows = {k: jax.lax.dynamic_update_index_in_dim(v, row[k].astype(v.dtype), slot, 0)
          for k, v in state['rows'].items()}
  full = [{name: f['index'].at[slot].set(length) if name == 'index' else
           jax.lax.dynamic_update_index_in_dim(f[name], c[name][0], slot, 0) for name in f}
          for f, c in zip(state['cache'], cache)]
  return dict(cache=full, rows=rows), row['last'][0], emit_1[0], row['finish'][0]


@functools.partial(jax.jit, static_argnames=('cfg', 'chunk'), donate_argnames=('state',))
def _decode(cfg, chunk: int, params, state: dict, stops, cancel_B, eager):
  """Up to `chunk` steps of every live slot; stops early when none is live, or (`eager`)
  when one ends. Slots in `cancel_B` end first. Returns (state, tokens [B, C], emitted [B, C]).
  """
  rows = dict(state['rows'], live=state['rows']['live'] & ~cancel_B)
  live_at_start_B = rows['live']
  n = live_at_start_B.shape[0]
  step_call = jax.vmap(functools.partial(_row_call, cfg, params))

  def running(carry):
    c, s, _, _ = carry
    ended = jnp.any(live_at_start_B & ~s['rows']['live'])
    return (c < chunk) & jnp.any(s['rows']['live']) & ~(eager & ended)

  def step(carry):
    c, s, out_BxC, emit_BxC = carry
    rows, live_B = s['rows'], s['rows']['live']
    index_B = s['cache'][0]['index']
    logits_BxV, cache = step_call(rows['last'], jnp.minimum(index_B, cfg.seq_len - 1), s['cache'])
    cache = [dict(c_, index=jnp.where(live_B, index_B + 1, index_B)) for c_ in cache]
    rows, emit_B = _commit(rows, _choose(cfg, logits_BxV, rows), stops)
    return (c + 1, dict(cache=cache, rows=rows), out_BxC.at[:, c].set(rows['last']),
            emit_BxC.at[:, c].set(emit_B))

  carry = (jnp.int32(0), dict(state, rows=rows), jnp.zeros((n, chunk), jnp.int32),
           jnp.zeros((n, chunk), bool))
  _, state, out_BxC, emit_BxC = jax.lax.while_loop(running, step, carry)
  return state, out_BxC, emit_BxC


def init_state(cfg, slots: int) -> dict:
  """Every slot free: an empty cache of seq_len positions a slot, and idle rows."""
  cache = model_lib.init_cache(cfg, slots, cfg.seq_len, jnp.dtype(cfg.dtype))
  cache = [dict(c, index=jnp.zeros(slots, jnp.int32)) for c in cache]
  zeros = lambda dtype: jnp.zeros(slots, dtype)
  rows = dict(last=zeros(jnp.int32), live=zeros(bool), length=zeros(jnp.int32),
              finish=zeros(jnp.int32), max_new=zeros(jnp.int32),
              temperature=zeros(jnp.float32), top_k=zeros(jnp.int32),
              top_p=jnp.ones(slots, jnp.float32), penalty=jnp.ones(slots, jnp.float32),
              key=jnp.zeros((slots, 2), jnp.uint32),
              seen=jnp.zeros((slots, cfg.vocab_size), bool))
  return dict(cache=cache, rows=rows)


# ---------------------------------------------------------------- host side

class WarmUpError(RuntimeError):
  """A warm-up request failed: the model cannot run its programs."""


@dataclasses.dataclass(eq=False)
class Request:
  """One generation. `on_tokens(ids, finish)` is called from the engine's thread with the new
  ids of each chunk and, on the last call, the finish reason ('stop', 'length', 'cancelled'
  or 'error'); ids exclude the stop id."""
  prompt: list[int]
  max_new_tokens: int
  on_tokens: Callable[[list[int], str | None], None]
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  seed: int = 0
  cancelled: bool = False


def _options(req: Request) -> dict:
  return dict(max_new=np.array([req.max_new_tokens], np.int32),
              temperature=np.array([req.temperature], np.float32),
              top_k=np.array([req.top_k], np.int32), top_p=np.array([req.top_p], np.float32),
              penalty=np.array([req.repetition_penalty], np.float32),
              key=np.asarray(jax.random.PRNGKey(req.seed % 2**31))[None])


class Engine:
  """Runs requests in `slots` batch slots on a thread of its own: `submit`, `cancel`, `close`."""

  def __init__(self, cfg, params, *, slots: int, chunk: int, stop_ids: Sequence[int]):
    self.cfg, self.params, self.chunk = cfg, params, chunk
    self.stops = sample.stop_array(stop_ids)
    self.state = init_state(cfg, slots)
    self.slots: list[Request | None] = [None] * slots
    self.waiting: collections.deque[Request] = collections.deque()
    self.to_cancel = np.zeros(slots, bool)   # freed on the host, still live on the device
    self.cond = threading.Condition()
    self.closed = False
    self.warming, self.error = False, None   # during warm_up; the last decode failure
    self.thread = threading.Thread(target=self._loop, name='engine', daemon=True)
    self.thread.start()

  def buckets(self) -> list[int]:
    """The prompt buckets: one prefill program each."""
    out, p = [], 16
    while p < self.cfg.seq_len:
      out.append(p)
      p *= 2
    return out + [self.cfg.seq_len]

  def check(self, prompt: Sequence[int], max_new_tokens: int) -> None:
    """ValueError unless the prompt and max_new_tokens fit the model (the caller words it)."""
    if not prompt or max_new_tokens < 1 or len(prompt) + max_new_tokens > self.cfg.seq_len:
      raise ValueError(f'{len(prompt)} prompt tokens + {max_new_tokens} new tokens do not fit '
                       f'the context of {self.cfg.seq_len}')

  def submit(self, req: Request) -> Request:
    self.check(req.prompt, req.max_new_tokens)
    with self.cond:
      if self.closed:
        raise RuntimeError('the engine is closed')
      self.waiting.append(req)
      self.cond.notify()
    return req

  def cancel(self, req: Request) -> None:
    """Ends `req` (its slot frees before the next decode chunk); no more calls after this."""
    with self.cond:
      req.cancelled = True
      self.cond.notify()

  def close(self) -> None:
    with self.cond:
      self.closed = True
      self.cond.notify()
    self.thread.join()

  def warm_up(self) -> int:
    """Compiles every program by running a request of each bucket; returns how many ran.
    Raises WarmUpError when one fails (the engine thread logs why)."""
    done = threading.Semaphore(0)
    failed = []
    self.warming = True
    lengths = [min(p, self.cfg.seq_len - 2) for p in self.buckets()]

    def on_tokens(ids, finish, n):
      if finish:
        if finish == 'error':
          failed.append(n)
        done.release()

    for n in sorted(set(lengths)):
      self.submit(Request([0] * n, 2, functools.partial(on_tokens, n=n)))
    for _ in set(lengths):
      done.acquire()
    self.warming = False
    if failed:
      raise WarmUpError(f'the warm-up requests of {len(failed)} of {len(set(lengths))} prompt '
                        f'lengths ({", ".join(map(str, sorted(failed)))} tokens) failed '
                        f'({self.error})')
    return len(set(lengths))

  @staticmethod
  def compiled() -> dict:
    """How many prefill and decode programs this process has compiled: fixed after warm_up."""
    return dict(prefill=_prefill._cache_size(), decode=_decode._cache_size())  # pylint: disable=protected-access

  def active(self) -> int:
    with self.cond:
      return sum(r is not None for r in self.slots)

  # -- the engine thread

  def _loop(self) -> None:
    while True:
      with self.cond:
        while not self.closed and not self.waiting and not any(self.slots):
          self.cond.wait()
        if self.closed:
          for req in [*self.waiting, *filter(None, self.slots)]:
            req.on_tokens([], 'cancelled')
          return
        admitted = self._admit()
        cancel_B = self.to_cancel.copy()
        self.to_cancel[:] = False
        eager = bool(self.waiting)
      try:
        for slot, req in admitted:
          self._prefill(slot, req)
        if any(self.slots) or cancel_B.any():
          self._decode(cancel_B, eager)
      except Exception as e:  # pylint: disable=broad-except
        self.error = f'{type(e).__name__}: {" ".join(str(e).split())[:300]}'
        if not self.warming:   # warm_up raises it, as one line
          logging.exception('engine: a decode call failed; failing its requests')
        self._fail_all(e)

  def _admit(self) -> list[tuple[int, Request]]:
    """Frees cancelled slots and gives free slots to waiting requests (holding the lock)."""
    for slot, req in enumerate(self.slots):
      if req is not None and req.cancelled:
        self.slots[slot] = None
        self.to_cancel[slot] = True
        req.on_tokens([], 'cancelled')
    admitted = []
    while self.waiting and None in self.slots:
      req = self.waiting.popleft()
      if req.cancelled:
        req.on_tokens([], 'cancelled')
        continue
      slot = self.slots.index(None)
      self.slots[slot] = req
      self.to_cancel[slot] = False   # the prefill resets the row
      admitted.append((slot, req))
    return admitted

  def _prefill(self, slot: int, req: Request) -> None:
    p = next(b for b in self.buckets() if b >= len(req.prompt))
    prompt_P = np.zeros(p, np.int32)
    prompt_P[:len(req.prompt)] = req.prompt
    self.state, tok, emit, finish = _prefill(
        self.cfg, self.params, self.state, np.int32(slot), prompt_P, np.int32(len(req.prompt)),
        _options(req), self.stops)
    tok, emit, finish = jax.device_get((tok, emit, finish))
    self._deliver(slot, [int(tok)] if emit else [], int(finish))

  def _decode(self, cancel_B: np.ndarray, eager: bool) -> None:
    self.state, out_BxC, emit_BxC = _decode(self.cfg, self.chunk, self.params, self.state,
                                            self.stops, cancel_B, np.bool_(eager))
    out_BxC, emit_BxC, finish_B = jax.device_get(
        (out_BxC, emit_BxC, self.state['rows']['finish']))
    for slot in range(len(self.slots)):
      if self.slots[slot] is not None:
        self._deliver(slot, out_BxC[slot][emit_BxC[slot]].tolist(), int(finish_B[slot]))

  def _deliver(self, slot: int, ids: list[int], finish: int) -> None:
    with self.cond:
      req = self.slots[slot]
      if req is None or req.cancelled:   # cancelled meanwhile: _admit reports it
        return
      if finish:
        self.slots[slot] = None
    if ids or finish:
      req.on_tokens(ids, FINISH.get(finish))

  def _fail_all(self, error: Exception) -> None:
    with self.cond:
      failed = [r for r in self.slots if r is not None]
      self.slots = [None] * len(self.slots)
      self.state = init_state(self.cfg, len(self.slots))
      self.to_cancel[:] = False
    for req in failed:
      req.on_tokens([], 'error')
    del error
