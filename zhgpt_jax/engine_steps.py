"""The engine's jitted programs (engine.py has the design): a batched prefill into named
slots, and decode chunks over a compacted batch of slot rows, both with optional raw
log-probabilities.

State: dict(cache=the model's KV cache pytree for B slots, each leaf with the slot on axis 0
and the position second to last (attention.py's layout), and a per-slot index [B];
rows=per-slot decoding state).
Shape letters: B slots, S cache positions, n prefill rows, P prompt bucket, b decode bucket,
V vocab (padded), C decode steps of a chunk, N top logprobs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from zhgpt_jax import model as model_lib
from zhgpt_jax import sample, score

GREEDY = sample.Mode(greedy=True, filters=False)
SAMPLED = sample.Mode(greedy=False, filters=False)
FILTERED = sample.Mode(greedy=False, filters=True)


# ---------------------------------------------------------------- device side (jitted)

def _gather(tree, idx):
  return jax.tree.map(lambda x: x[idx], tree)


def _scatter(tree, idx, part):
  """`tree` with rows `idx` (axis 0) set from `part`; indices past the end are dropped."""
  return jax.tree.map(lambda x, y: x.at[idx].set(y.astype(x.dtype), mode='drop'), tree, part)


def _index(cache):
  """Each row's cache index: the one leaf of the cache with a value a row ([B])."""
  return next(x for x in jax.tree.leaves(cache) if x.ndim == 1)


def _row_call(cfg, params, tok, position, row_cache):
  """sample.model_call for one row: its last token at its position, its own cache index."""
  if cfg.mlp == 'moe':
    # ragged_dot has no vmap rule; for one token a row, fixed blocks never drop (capacity 0).
    cfg = dataclasses.replace(
        cfg, moe=dataclasses.replace(cfg.moe, grouped='capacity', capacity_factor=0.0))
  batch1 = lambda x: x if x.ndim == 0 else x[None]
  logits_1x1xV, cache = sample.model_call(
      cfg, params, tok[None, None], position[None, None], jax.tree.map(batch1, row_cache),
      jnp.ones((1, cfg.seq_len), bool))
  return logits_1x1xV[0, 0], jax.tree.map(lambda x: x if x.ndim == 0 else x[0], cache)


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


def _logprobs(cfg, top_n: int, logits_XxV, ids_X, wanted):
  """The raw model's log-probabilities at each of X positions, as `main.py eval --tasks`
  computes them (score.log_probs): (logprob of ids_X, is it the argmax, top_n ids, their
  logprobs); zeros unless `wanted` (a traced bool), so unasked it costs nothing.
  `logits_XxV()` gives the logits (called only when wanted)."""
  x = ids_X.shape

  def compute():
    return score.log_probs(cfg, logits_XxV(), ids_X, top_n)

  def skip():
    return (jnp.zeros(x, jnp.float32), jnp.zeros(x, bool), jnp.zeros((*x, top_n), jnp.int32),
            jnp.zeros((*x, top_n), jnp.float32))

  return jax.lax.cond(wanted, compute, skip)


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


@functools.partial(jax.jit, static_argnames=('cfg', 'top_n'), donate_argnames=('state',))
def prefill(cfg, top_n: int, params, state: dict, slots_n, prompts_nxP, lengths_n,
             options: dict, stops):
  """Prefills n prompts (row i: its first lengths_n[i] of P ids) into `slots_n` (B = none: a
  scoring-only row) and picks each one's first token.

  `options` holds each row's max_new, temperature, top_k, top_p, penalty, logprobs, score
  and seed ([n]; the row's key is PRNGKey(seed), made here: one dispatch fewer a request on
  the host). Returns (state, out): out has the token, whether it was emitted, the finish
  code, its logprobs ([n], [n, N]) and the prompt's scores ([n, P], [n, P, N]).
  """
  n, p = prompts_nxP.shape
  cache = model_lib.init_cache(cfg, n, p, jnp.dtype(cfg.dtype))
  # The pad after each prompt is causally invisible to it; decoding overwrites its positions.
  hidden_nxPxD, head_DxV, cache = sample.hidden_call(
      cfg, params, prompts_nxP, jnp.broadcast_to(jnp.arange(p), (n, p)), cache,
      jnp.ones((n, p), bool))
  seen_ids_nxP = jnp.where(jnp.arange(p)[None] < lengths_n[:, None], prompts_nxP, cfg.vocab_size)
  options = dict(options)
  rows = dict(options, key=jax.vmap(jax.random.PRNGKey)(options.pop('seed')),
              last=jnp.zeros(n, jnp.int32), live=jnp.ones(n, bool),
              length=jnp.zeros(n, jnp.int32), finish=jnp.zeros(n, jnp.int32),
              seen=jnp.zeros((n, cfg.vocab_size), bool).at[
                  jnp.arange(n)[:, None], seen_ids_nxP].set(True, mode='drop'))
  # The head runs at each row's last prompt position only, and at every position only for
  # a call with a scoring row (under _logprobs' cond).
  logits_nxV = model_lib.head_logits(cfg, hidden_nxPxD[jnp.arange(n), lengths_n - 1], head_DxV)
  tok_n = _choose(cfg, logits_nxV, rows)
  lp_n, _, top_ids_nxN, top_lp_nxN = _logprobs(cfg, top_n, lambda: logits_nxV, tok_n,
                                               jnp.any(rows['logprobs']))
  rows, emit_n = _commit(rows, tok_n, stops)
  next_nxP = jnp.concatenate([prompts_nxP[:, 1:], jnp.zeros((n, 1), jnp.int32)], axis=1)
  scores = _logprobs(cfg, top_n, lambda: model_lib.head_logits(cfg, hidden_nxPxD, head_DxV),
                     next_nxP, jnp.any(rows['score']))
  del rows['score']
  # Each prefilled row is positions [0, P) of its slot's cache; its index is its length.
  full = jax.tree.map(
      lambda f, c: (f.at[slots_n].set(lengths_n, mode='drop') if c.ndim == 0 else
                    f.at[slots_n, ..., :p, :].set(c.astype(f.dtype), mode='drop')),
      state['cache'], cache)
  state = dict(cache=full, rows=_scatter(state['rows'], slots_n, rows))
  out = dict(token=rows['last'], emit=emit_n, finish=rows['finish'], lp=lp_n,
             top_ids=top_ids_nxN, top_lp=top_lp_nxN, scores=scores)
  return state, out


@functools.partial(jax.jit, static_argnames=('cfg', 'chunk', 'top_n'),
                   donate_argnames=('state',))
def decode(cfg, chunk: int, top_n: int, params, state: dict, idx_b, stops, cancel_B, eager,
           steps):
  """Up to `steps` <= `chunk` steps (a traced count: one program for any) of the slots
  `idx_b` (distinct); stops early when none is live, or (`eager`) when one ends. Slots in
  `cancel_B` end first. Returns (state, out): out has tokens and emitted [b, C], and each
  token's logprob [b, C] and top [b, C, N]."""
  state = dict(state, rows=dict(state['rows'], live=state['rows']['live'] & ~cancel_B))
  sub = _gather(state, idx_b)
  live_at_start_b = sub['rows']['live']
  b = idx_b.shape[0]
  step_call = jax.vmap(functools.partial(_row_call, cfg, params))

  def running(carry):
    c, s, _ = carry
    ended = jnp.any(live_at_start_b & ~s['rows']['live'])
    return (c < jnp.minimum(steps, chunk)) & jnp.any(s['rows']['live']) & ~(eager & ended)

  def step(carry):
    c, s, out = carry
    rows, live_b = s['rows'], s['rows']['live']
    index_b = _index(s['cache'])
    logits_bxV, cache = step_call(rows['last'], jnp.minimum(index_b, cfg.seq_len - 1),
                                  s['cache'])
    # A row that is not live keeps its index (what it wrote past it is never attended to).
    cache = jax.tree.map(lambda new, old: jnp.where(live_b, new, old) if new.ndim == 1 else new,
                         cache, s['cache'])
    tok_b = _choose(cfg, logits_bxV, rows)
    lp_b, _, top_ids, top_lp = _logprobs(cfg, top_n, lambda: logits_bxV, tok_b,
                                         jnp.any(live_b & rows['logprobs']))
    rows, emit_b = _commit(rows, tok_b, stops)
    put = lambda a, x: a.at[:, c].set(x)
    out = dict(token=put(out['token'], rows['last']), emit=put(out['emit'], emit_b),
               lp=put(out['lp'], lp_b), top_ids=put(out['top_ids'], top_ids),
               top_lp=put(out['top_lp'], top_lp))
    return c + 1, dict(cache=cache, rows=rows), out

  out = dict(token=jnp.zeros((b, chunk), jnp.int32), emit=jnp.zeros((b, chunk), bool),
             lp=jnp.zeros((b, chunk), jnp.float32),
             top_ids=jnp.zeros((b, chunk, top_n), jnp.int32),
             top_lp=jnp.zeros((b, chunk, top_n), jnp.float32))
  _, sub, out = jax.lax.while_loop(running, step, (jnp.int32(0), sub, out))
  state = _scatter(state, idx_b, sub)
  return state, dict(out, finish=sub['rows']['finish'])


def init_state(cfg, slots: int) -> dict:
  """Every slot free: an empty cache of seq_len positions a slot, and idle rows."""
  cache = model_lib.init_cache(cfg, slots, cfg.seq_len, jnp.dtype(cfg.dtype))
  cache = jax.tree.map(lambda x: jnp.zeros(slots, jnp.int32) if x.ndim == 0 else x, cache)
  zeros = lambda dtype: jnp.zeros(slots, dtype)
  rows = dict(last=zeros(jnp.int32), live=zeros(bool), length=zeros(jnp.int32),
              finish=zeros(jnp.int32), max_new=zeros(jnp.int32),
              temperature=zeros(jnp.float32), top_k=zeros(jnp.int32),
              top_p=jnp.ones(slots, jnp.float32), penalty=jnp.ones(slots, jnp.float32),
              logprobs=zeros(bool), key=jnp.zeros((slots, 2), jnp.uint32),
              seen=jnp.zeros((slots, cfg.vocab_size), bool))
  return dict(cache=cache, rows=rows)
