"""Scoring: the log-probability the model gives each token of a text, and the top alternatives.

A scoring request is a prefill whose logits are kept: one forward pass over right-padded
rows (causal attention, so the pad after a row is invisible to it) and a log-softmax over
the whole vocabulary at the positions asked for. The whole (padded) vocabulary is the
distribution training's loss and the HuggingFace export define, so these are the numbers
`lm_eval --model hf` and vLLM compute on the export; the raw model's, before any
temperature, penalty or filter. Padding ids (>= real_vocab_size) are never a top
alternative or a greedy pick: they are not tokens.

`log_probs` is the one definition of those numbers (the server's engine calls it too);
`score` is the jitted forward pass of the evaluation harness, the head applied only where a
score is wanted; `score_rows` runs it over any number of token lists: rows that share their
inputs (the choices of a question whose answers are one token each) share one pass, and
lengths are bucketed to powers of two so a handful of programs serve every length (finer
buckets pad less, but each costs a compile: measured in BENCHMARKS.md "Evaluation").

Shape letters: B rows, L positions, X scored positions, V vocab (padded), N top alternatives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zhgpt_jax import model as model_lib

MAX_TOP = 20          # OpenAI's limit on logprobs / top_logprobs


def exact(cfg: model_lib.GPTConfig) -> model_lib.GPTConfig:
  """`cfg` for scoring: MoE capacity blocks that never drop a token (the padding rows of a
  batch must not change a real row's experts)."""
  if cfg.mlp == 'moe':
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=0.0))
  return cfg


def log_probs(cfg, logits_XxV, ids_X, top_n: int):
  """The model's log-probabilities at X positions: (logprob of ids_X, whether it is the most
  likely real token, the top_n real tokens' ids and logprobs, most likely first).

  The softmax runs over the whole (padded) vocabulary, the distribution of training's loss
  and of the export; padding ids are never the argmax or a top alternative. The one
  definition the harness (`score`) and the server (engine_steps) share.
  """
  logp_XxV = jax.nn.log_softmax(logits_XxV.astype(jnp.float32), axis=-1)
  real_V = jnp.arange(logp_XxV.shape[-1]) < cfg.real_vocab_size
  real_logp_XxV = jnp.where(real_V, logp_XxV, -jnp.inf)
  lp_X = jnp.take_along_axis(logp_XxV, ids_X[..., None], axis=-1)[..., 0]
  best_X = jnp.argmax(real_logp_XxV, axis=-1) == ids_X
  top_lp, top_ids = jax.lax.top_k(real_logp_XxV, max(top_n, 1))
  return lp_X, best_X, top_ids[..., :top_n].astype(jnp.int32), top_lp[..., :top_n]


@functools.partial(jax.jit, static_argnames=('cfg', 'top_n'))
def score(cfg, params, inputs_BxL, row_X, at_X, targets_X, top_n: int = 0) -> dict:
  """Scores X (row, position, target) triples: log p(targets_X | inputs_BxL[row_X, :at_X + 1]).

  The transformer runs over every row; the head and the log-softmax only at the X positions
  asked for (a log-likelihood needs its continuation's positions, not every position's, and
  at a small width the head over the vocabulary is much of the model's work). Returns
  logprob_X, greedy_X (whether the target is the most likely real token) and, with
  top_n > 0, top_ids_XxN / top_logprob_XxN (`log_probs`). Rows are right-padded: what follows
  a row's last real input is never seen by it.
  """
  hidden_BxLxD, aux = model_lib.GPT(cfg).apply({'params': params}, inputs_BxL, hidden=True)
  logits_XxV = model_lib.head_logits(cfg, hidden_BxLxD[row_X, at_X], aux['head_DxV'])
  lp, best, top_ids, top_lp = log_probs(cfg, logits_XxV, targets_X, top_n)
  out = dict(logprob_X=lp, greedy_X=best)
  if top_n:
    out['top_logprob_XxN'], out['top_ids_XxN'] = top_lp, top_ids
  return out


class Scored(NamedTuple):
  """Scores of a row's tokens, entry t about one token: with score_rows' default tails, token
  t of the row, whose entry 0 has none (nan, False, -1); with a tail of n, its last n tokens."""
  logprobs: np.ndarray      # [n] float32
  greedy: np.ndarray        # [n] bool
  top_ids: np.ndarray       # [n, N] int32 (N = 0 without top_n)
  top_logprobs: np.ndarray  # [n, N] float32


def buckets(seq_len: int) -> list[int]:
  """Input lengths a program is compiled for: 16, 32, ... and seq_len."""
  out, p = [], 16
  while p < seq_len:
    out.append(p)
    p *= 2
  return out + [seq_len]


def tokens_per_call() -> int:
  """Rows x positions of one scoring call: 2048 on a CPU, where a call's activations then
  stay in cache (600 zh_mc items, 2-core machine: 2.2 CPU s at 2048, 3.8 at 8192;
  BENCHMARKS.md "Evaluation"), 8192 on an accelerator."""
  return 2048 if jax.default_backend() == 'cpu' else 8192


def rows_per_call(length: int, tokens: int) -> int:
  """Rows of one call at input length `length`: a power of two within the token budget."""
  return 1 << max(0, (max(1, tokens // length)).bit_length() - 1)


def _pow2(n: int) -> int:
  return 1 << max(0, n - 1).bit_length()


def pack(inputs: Sequence[Sequence[int]], wanted: Sequence[Sequence[tuple[Sequence[int], int]]],
         length: int, batch: int, per_row: int):
  """`score`'s arguments for a call: inputs [batch, length] (right-padded with id 0) and
  row_X, at_X, targets_X (X = batch x per_row): for input i, each (row, n) of wanted[i] asks
  for the row's last n tokens (row[:-1] is input i). Unused slots ask for row 0, position 0."""
  inputs_BxL = np.zeros((batch, length), np.int32)
  row_X, at_X, targets_X = (np.zeros(batch * per_row, np.int32) for _ in range(3))
  x = 0
  for i, (ids, asks) in enumerate(zip(inputs, wanted)):
    inputs_BxL[i, :len(ids)] = ids
    for row, n in asks:
      row_X[x:x + n] = i
      at_X[x:x + n] = np.arange(len(ids) - n, len(ids))
      targets_X[x:x + n] = row[len(row) - n:]
      x += n
    x = (i + 1) * per_row
  return inputs_BxL, row_X, at_X, targets_X


def _empty(top_n: int) -> Scored:
  return Scored(np.zeros(0, np.float32), np.zeros(0, bool), np.zeros((0, top_n), np.int32),
                np.zeros((0, top_n), np.float32))


def _cut(out: dict, x: int, n: int) -> Scored:
  """Entries x .. x + n of `score`'s host arrays."""
  if 'top_ids_XxN' in out:
    ids, tlp = out['top_ids_XxN'][x:x + n], out['top_logprob_XxN'][x:x + n]
  else:
    ids, tlp = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
  return Scored(out['logprob_X'][x:x + n].astype(np.float32), out['greedy_X'][x:x + n], ids, tlp)


def score_rows(cfg, params, rows: Sequence[Sequence[int]], top_n: int = 0,
               tokens: int | None = None, tails: Sequence[int] | None = None,
               done: Callable[[int], object] = lambda n: None) -> list[Scored]:
  """Scores token lists of 1 to seq_len + 1 tokens each (the last one is only predicted).

  Without `tails`, every token of a row (entry 0 empty: nan, False, -1); with it, the last
  tails[i] tokens of row i only (a log-likelihood's continuation). Rows with the same
  inputs (all but the last token: the choices of a multiple-choice question whose answers
  are one token) share one forward pass. Inputs are grouped by length bucket, `rows_per_call`
  to a call (`tokens` rows x positions, default `tokens_per_call`); returns one `Scored` per
  row, in the order given. done(n) is told after each call how many more rows it scored (a
  progress bar).
  """
  cfg = exact(cfg)
  tokens = tokens or tokens_per_call()
  limits = buckets(cfg.seq_len)
  wanted = [len(row) - 1 for row in rows] if tails is None else list(tails)
  shared: dict[tuple, list[int]] = {}   # inputs -> the rows that have them
  for i, row in enumerate(rows):
    if not 1 <= len(row) <= cfg.seq_len + 1 or not 0 <= wanted[i] < len(row):
      raise ValueError(f'row {i} has {len(row)} tokens; scoring takes 1 to {cfg.seq_len + 1}'
                       + ('' if tails is None else f', and a tail of 0 to {len(row) - 1}'))
    if wanted[i]:
      shared.setdefault(tuple(row[:-1]), []).append(i)
  result: list[Scored | None] = [None if n else _empty(top_n) for n in wanted]
  by_bucket: dict[int, list[tuple]] = {}
  for ids in shared:
    by_bucket.setdefault(next(b for b in limits if b >= len(ids)), []).append(ids)
  for length in sorted(by_bucket, reverse=True):
    keys = by_bucket[length]
    per_row = _pow2(max(sum(wanted[i] for i in shared[k]) for k in keys))
    batch = min(rows_per_call(max(length, per_row), tokens), _pow2(len(keys)))
    for start in range(0, len(keys), batch):
      part = keys[start:start + batch]
      asks = [[(rows[i], wanted[i]) for i in shared[k]] for k in part]
      out = jax.device_get(score(cfg, params, *pack(part, asks, length, batch, per_row), top_n))
      for b, k in enumerate(part):
        x = b * per_row
        for i in shared[k]:
          result[i] = _cut(out, x, wanted[i])
          x += wanted[i]
      done(sum(len(shared[k]) for k in part))
  if tails is None:
    result = [_with_first(s, top_n) for s in result]
  return result


def _with_first(s: Scored, top_n: int) -> Scored:
  """`s` with the empty entry of a row's first token in front (nothing predicts it)."""
  return Scored(np.concatenate([[np.nan], s.logprobs]).astype(np.float32),
                np.concatenate([[False], s.greedy]),
                np.concatenate([np.full((1, top_n), -1, np.int32), s.top_ids]),
                np.concatenate([np.full((1, top_n), np.nan, np.float32), s.top_logprobs]))
