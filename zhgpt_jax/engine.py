"""Batched decoding for the server: concurrent requests share prefill calls and decode steps.

The engine keeps one KV cache of B slots x S positions (S = the model's seq_len) and a row of
state a slot (last token, length, options, seen ids). A request takes a free slot; the host
thread then runs two kinds of jitted call, both on the slots it names, never on all B:

- **Prefill** of up to `prefill_rows` waiting requests in one call: their prompts, left-aligned
  and padded to one prompt bucket P (16, 32, ... S), run through a fresh n x P cache that is
  then written into their slots' rows (positions [0, P); decoding overwrites the pad), and
  each picks its first token (the head runs at its last prompt position only). Shapes
  (`prefill_shapes`): n in 1, 4, 16, ... with n x P <= max(S / 2, 64).
- **Decode** of the live slots: their indices are compacted into the smallest decode bucket
  b (1, 4, 16, ... B) that holds them, padded with free slots (never live, so they change
  nothing the host reads); their rows are gathered, stepped up to `chunk` times in one
  while_loop (each row its own cache index and options), and scattered back. A step's cost
  follows the live requests, not B. The loop returns early when no row is live, or
  (`eager`) when a row ends while requests wait for a slot. A call right after requests
  joined, with slots still free, runs one step: more requests may be arriving (a burst of
  clients), and one that comes during a call waits for all of it. The step count is a
  traced value, so this compiles nothing.

The two programs are in engine_steps.py; this module is the host side. Every shape is fixed
when the engine starts (`warm_up` compiles them all; `compiled()` counts them for /health);
a request's length, options and seed are traced values.

Pieces shared with sample.py (`main.py sample`): the cache forward pass is
`sample.model_call`, vmapped over rows so that each has its own cache index; tokens are
chosen by `sample.choose` with a row of options each; a row's random keys are
`sample.row_keys(PRNGKey(seed), step, 1)`, the keys of a single prompt there. So a greedy
reply is `main.py sample`'s greedy continuation of the same ids, and a seeded one samples
what it samples with that seed, whatever else shares the batch.

Log-probabilities (raw model: log-softmax of the logits with vocab padding masked, before
repetition penalty, temperature and filters):

- `Request(logprobs=True, top_logprobs=k)`: each generated token's logprob, and the k <=
  `top_logprobs` most likely (id, logprob) at its step, appended to `req.token_logprobs` /
  `req.top` before the `on_tokens` call that delivers the token. Computed under a `lax.cond`,
  so a batch where no live row asks pays nothing.
- **Scoring** (lm-evaluation-harness's loglikelihood): a request with `prompt_logprobs=True`
  is a prefill whose logits are kept. `req.prompt_scores[i]` (i >= 1) is (logprob of
  prompt[i] given prompt[:i], whether it is the argmax there, the top k (id, logprob));
  [0] is None. A scoring-only request (`max_new_tokens=0`) takes no slot (its rows are
  written to index B, which the scatter drops) and shares prefill calls with other waiting
  requests, so many scoring requests batch together instead of queueing one by one; it ends
  with finish 'length' and no ids. With max_new_tokens > 0 it also generates as usual (echo).

The cache is handled as a pytree whose per-slot leaves have the slot on axis 0 and the
position second to last (plus a per-slot 'index'), so another cache layout (e.g. a latent
attention cache) needs no change here.

Shape letters: B slots, S cache positions, n prefill rows, P prompt bucket, b decode bucket,
V vocab (padded), C decode steps of a chunk, N top logprobs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import os
import threading
from typing import Callable, Sequence

import jax
import numpy as np

from zhgpt_jax import engine_steps as steps
from zhgpt_jax import sample

FINISH = {1: 'stop', 2: 'length'}   # the codes rows['finish'] holds; 0 = still running


# ---------------------------------------------------------------- host side

class WarmUpError(RuntimeError):
  """A warm-up program failed: the model cannot run its programs."""


@dataclasses.dataclass(eq=False)
class Request:
  """One generation (or scoring). `on_tokens(ids, finish)` is called from the engine's thread
  with the new ids of each chunk and, on the last call, the finish reason ('stop', 'length',
  'cancelled' or 'error'); ids exclude the stop id. With `logprobs`, `token_logprobs` and
  `top` hold an entry per delivered id before the call; with `prompt_logprobs`,
  `prompt_scores` is filled before the first call (module docstring)."""
  prompt: list[int]
  max_new_tokens: int
  on_tokens: Callable[[list[int], str | None], None]
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  seed: int = 0
  logprobs: bool = False
  top_logprobs: int = 0
  prompt_logprobs: bool = False
  cancelled: bool = False
  token_logprobs: list = dataclasses.field(default_factory=list)
  top: list = dataclasses.field(default_factory=list)
  prompt_scores: list = dataclasses.field(default_factory=list)


def _options(reqs: Sequence[Request]) -> dict:
  col = lambda f, dtype: np.array([f(r) for r in reqs], dtype)
  return dict(max_new=col(lambda r: max(r.max_new_tokens, 1), np.int32),
              temperature=col(lambda r: r.temperature, np.float32),
              top_k=col(lambda r: r.top_k, np.int32), top_p=col(lambda r: r.top_p, np.float32),
              penalty=col(lambda r: r.repetition_penalty, np.float32),
              logprobs=col(lambda r: r.logprobs, bool),
              score=col(lambda r: r.prompt_logprobs, bool),
              seed=col(lambda r: r.seed % 2**31, np.int32))


def _line(e: Exception) -> str:
  return f'{type(e).__name__}: {" ".join(str(e).split())[:300]}'


def _ladder(most: int) -> list[int]:
  """1, 4, 16, ... below `most`, and `most`: few programs, at most 4x the rows needed."""
  out = [1]
  while out[-1] * 4 < most:
    out.append(out[-1] * 4)
  return sorted(set(out + [most]))


def _fit(n: int, sizes: list[int]) -> int:
  return next(x for x in sizes if x >= n)


class Engine:
  """Runs requests in `slots` batch slots on a thread of its own: `submit`, `cancel`, `close`.

  `prefill_rows`: the most waiting requests one prefill call takes; `top_logprobs`: the most
  top logprobs a request may ask for (one compiled width)."""

  def __init__(self, cfg, params, *, slots: int, chunk: int, stop_ids: Sequence[int],
               prefill_rows: int = 4, top_logprobs: int = 20):
    self.cfg, self.params, self.chunk, self.top_n = cfg, params, chunk, top_logprobs
    self.prefill_rows = max(1, min(prefill_rows, slots))
    self.stops = sample.stop_array(stop_ids)
    self.state = steps.init_state(cfg, slots)
    self.slots: list[Request | None] = [None] * slots
    self.waiting: collections.deque[Request] = collections.deque()
    self.to_cancel = np.zeros(slots, bool)   # freed on the host, still live on the device
    self.cond = threading.Condition()
    self.closed = False
    self.error = None   # the last device call's failure, one line
    self.thread = threading.Thread(target=self._loop, name='engine', daemon=True)
    self.thread.start()

  def buckets(self) -> list[int]:
    """The prompt buckets P."""
    out, p = [], 16
    while p < self.cfg.seq_len:
      out.append(p)
      p *= 2
    return out + [self.cfg.seq_len]

  def prefill_shapes(self) -> list[tuple[int, int]]:
    """(rows n, bucket P) of every prefill program: n = 1, 4, 16, ... up to prefill_rows,
    n x P <= max(S / 2, 64): short prompts arrive together; a long one gains little from
    company, and every shape is a program to compile at start."""
    budget = max(self.cfg.seq_len // 2, 64)
    return [(n, p) for p in self.buckets() for n in _ladder(self.prefill_rows)
            if n == 1 or n * p <= budget]

  def decode_buckets(self) -> list[int]:
    """The decode batch sizes b: 1, 4, 16, ... and the slot count."""
    return _ladder(len(self.slots))

  def check(self, prompt: Sequence[int], max_new_tokens: int) -> None:
    """ValueError unless the prompt and max_new_tokens fit the model (the caller words it)."""
    if not prompt or max_new_tokens < 0 or len(prompt) + max_new_tokens > self.cfg.seq_len:
      raise ValueError(f'{len(prompt)} prompt tokens + {max_new_tokens} new tokens do not fit '
                       f'the context of {self.cfg.seq_len}')

  def submit(self, req: Request) -> Request:
    self.check(req.prompt, req.max_new_tokens)
    if req.max_new_tokens == 0 and not req.prompt_logprobs:
      raise ValueError('max_new_tokens=0 without prompt_logprobs asks for nothing')
    if not 0 <= req.top_logprobs <= self.top_n:
      raise ValueError(f'top_logprobs={req.top_logprobs}: must be in 0..{self.top_n}')
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
    """Compiles every program, on every core at once (before any request, on scratch
    states); returns how many. Raises WarmUpError when one fails."""
    b, cfg, params = len(self.slots), self.cfg, self.params
    # Called exactly as the engine thread calls them (positional), so their cache entries hit.
    jobs = [lambda state, n=n, p=p: steps.prefill(
        cfg, self.top_n, params, state, np.full(n, b, np.int32), np.zeros((n, p), np.int32),
        np.ones(n, np.int32), _options([Request([0], 1, None)] * n), self.stops)
            for n, p in self.prefill_shapes()]
    jobs += [lambda state, n=n: steps.decode(
        cfg, self.chunk, self.top_n, params, state, np.arange(n, dtype=np.int32), self.stops,
        np.zeros(b, bool), np.bool_(False), np.int32(self.chunk))
             for n in self.decode_buckets()]
    names = ([f'prefill of {n} x {p} tokens' for n, p in self.prefill_shapes()]
             + [f'decode of {n} rows' for n in self.decode_buckets()])

    def run(job):   # a scratch state each: the real one is donated to no one meanwhile
      jax.block_until_ready(job(steps.init_state(cfg, b)))

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      for name, future in zip(names, [pool.submit(run, job) for job in jobs]):
        try:
          future.result()
        except Exception as e:  # pylint: disable=broad-except
          raise WarmUpError(f'the warm-up {name} failed ({_line(e)})') from None
    return len(jobs)

  @staticmethod
  def compiled() -> dict:
    """How many prefill and decode programs this process has compiled: fixed after warm_up."""
    return dict(prefill=steps.prefill._cache_size(),  # pylint: disable=protected-access
                decode=steps.decode._cache_size())  # pylint: disable=protected-access

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
        live = [i for i, r in enumerate(self.slots) if r is not None]
        # Requests just joined and slots are still free: a burst may be arriving, and a request
        # that comes during a decode call waits for all of it. One step, then look again.
        filling = None in self.slots and any(r.max_new_tokens for _, r in admitted)
      try:
        for group in self._groups(admitted):
          self._prefill(group)
        live = [i for i in live if self.slots[i] is not None]
        if live or cancel_B.any():
          self._decode(live, cancel_B, eager, 1 if filling else self.chunk)
      except Exception as e:  # pylint: disable=broad-except
        self.error = _line(e)
        logging.exception('engine: a device call failed; failing its requests')
        self._fail_all(e, [r for _, r in admitted])

  def _admit(self) -> list[tuple[int, Request]]:
    """Frees cancelled slots and gives free slots to waiting requests (holding the lock); a
    scoring-only request gets slot B (none)."""
    for slot, req in enumerate(self.slots):
      if req is not None and req.cancelled:
        self.slots[slot] = None
        self.to_cancel[slot] = True
        req.on_tokens([], 'cancelled')
    admitted, keep = [], collections.deque()
    while self.waiting:
      req = self.waiting.popleft()
      if req.cancelled:
        req.on_tokens([], 'cancelled')
      elif req.max_new_tokens == 0:
        admitted.append((len(self.slots), req))
      elif None in self.slots:
        slot = self.slots.index(None)
        self.slots[slot] = req
        self.to_cancel[slot] = False   # the prefill resets the row
        admitted.append((slot, req))
      else:
        keep.append(req)
    self.waiting = keep
    return admitted

  def _groups(self, admitted):
    """The admitted requests by prompt length, in groups that fit a prefill shape."""
    shapes = self.prefill_shapes()
    group, out = [], []
    for slot, req in sorted(admitted, key=lambda x: len(x[1].prompt)):
      p = sample.bucket(len(req.prompt))
      rows = [n for n, q in shapes if q == min(p, self.cfg.seq_len) and n > len(group)]
      if group and not rows:
        out.append(group)
        group = []
      group.append((slot, req))
    return out + [group] if group else out

  def _prefill(self, group: list[tuple[int, Request]]) -> None:
    reqs = [r for _, r in group]
    p = min(sample.bucket(max(len(r.prompt) for r in reqs)), self.cfg.seq_len)
    n = _fit(len(group), sorted(n for n, q in self.prefill_shapes() if q == p))
    prompts_nxP = np.zeros((n, p), np.int32)
    for i, r in enumerate(reqs):
      prompts_nxP[i, :len(r.prompt)] = r.prompt
    pad = n - len(group)
    slots_n = np.array([s for s, _ in group] + [len(self.slots)] * pad, np.int32)
    lengths_n = np.array([len(r.prompt) for r in reqs] + [1] * pad, np.int32)
    options = _options(reqs + [reqs[0]] * pad)
    options['score'][len(group):] = False
    options['logprobs'][len(group):] = False
    self.state, out = steps.prefill(self.cfg, self.top_n, self.params, self.state, slots_n,
                               prompts_nxP, lengths_n, options, self.stops)
    want = any(r.logprobs for r in reqs) or any(r.prompt_logprobs for r in reqs)
    out = jax.device_get(out if want else {k: out[k] for k in ('token', 'emit', 'finish')})
    for i, (slot, req) in enumerate(group):
      if req.prompt_logprobs:
        lp, best, ids, lps = (np.asarray(a[i]) for a in out['scores'])
        req.prompt_scores = [None] + [
            (float(lp[j]), bool(best[j]), self._top(ids[j], lps[j], req))
            for j in range(len(req.prompt) - 1)]
      if req.max_new_tokens == 0:
        req.on_tokens([], 'length')
        continue
      emit = bool(out['emit'][i])
      if emit and req.logprobs:
        self._record(req, [out['lp'][i]], [out['top_ids'][i]], [out['top_lp'][i]])
      self._deliver(slot, [int(out['token'][i])] if emit else [], int(out['finish'][i]))

  def _decode(self, live: list[int], cancel_B: np.ndarray, eager: bool, n_steps: int) -> None:
    b = _fit(len(live), self.decode_buckets())
    free = [i for i in range(len(self.slots)) if i not in set(live)]
    idx_b = np.array(live + free[:b - len(live)], np.int32)
    self.state, out = steps.decode(self.cfg, self.chunk, self.top_n, self.params, self.state,
                              idx_b, self.stops, cancel_B, np.bool_(eager), np.int32(n_steps))
    want = any(self.slots[i] is not None and self.slots[i].logprobs for i in live)
    out = jax.device_get(out if want else {k: out[k] for k in ('token', 'emit', 'finish')})
    for row, slot in enumerate(live):
      req, emit_C = self.slots[slot], out['emit'][row]
      if req is not None and req.logprobs and not req.cancelled:
        self._record(req, out['lp'][row][emit_C], out['top_ids'][row][emit_C],
                     out['top_lp'][row][emit_C])
      self._deliver(slot, out['token'][row][emit_C].tolist(), int(out['finish'][row]))

  @staticmethod
  def _top(ids, lps, req: Request) -> list[tuple[int, float]]:
    return [(int(i), float(x)) for i, x in zip(ids[:req.top_logprobs], lps[:req.top_logprobs])]

  def _record(self, req: Request, lps, top_ids, top_lps) -> None:
    req.token_logprobs.extend(float(x) for x in lps)
    req.top.extend(self._top(i, x, req) for i, x in zip(top_ids, top_lps))

  def _deliver(self, slot: int, ids: list[int], finish: int) -> None:
    with self.cond:
      req = self.slots[slot]
      if req is None or req.cancelled:   # cancelled meanwhile: _admit reports it
        return
      if finish:
        self.slots[slot] = None
    if ids or finish:
      req.on_tokens(ids, FINISH.get(finish))

  def _fail_all(self, error: Exception, admitted: list[Request]) -> None:
    with self.cond:
      failed = [r for r in self.slots if r is not None]
      failed += [r for r in admitted if r.max_new_tokens == 0 and not r.prompt_scores]
      self.slots = [None] * len(self.slots)
      self.state = steps.init_state(self.cfg, len(self.slots))
      self.to_cancel[:] = False
    for req in failed:
      req.on_tokens([], 'error')
    del error
