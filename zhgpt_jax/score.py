"""Scoring: the log-probability the model gives each token of a text, and the top alternatives.

A scoring request is a prefill whose logits are kept: one forward pass over right-padded
rows (causal attention, so the pad after a row is invisible to it) and a log-softmax over
the whole vocabulary at every position. The whole (padded) vocabulary is the distribution
training's loss and the HuggingFace export define, so these are the numbers `lm_eval
--model hf` and vLLM compute on the export; the raw model's, before any temperature,
penalty or filter. Padding ids (>= real_vocab_size) are never a top alternative or a
greedy pick: they are not tokens.

`score` is the jitted function (the evaluation harness and the server's engine both call
it); `score_rows` runs it over any number of token lists, bucketing lengths to powers of
two so a handful of programs serve every length.

Shape letters: B rows, L positions, V vocab (padded), N top alternatives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zhgpt_jax import model as model_lib

MAX_TOP = 20          # OpenAI's limit on logprobs / top_logprobs
TOKENS_PER_CALL = 8192   # rows x positions of one call (the logits are rows x positions x V)


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
def score(cfg, params, inputs_BxL, targets_BxL, top_n: int = 0) -> dict:
  """Scores `targets_BxL` (each position's next token) given `inputs_BxL`.

  Returns logprob_BxL (log p(target | inputs up to here)), greedy_BxL (whether the target is
  the most likely real token) and, with top_n > 0, top_ids_BxLxN / top_logprob_BxLxN
  (`log_probs`). Rows are right-padded: what follows a row's last real input is never seen
  by it.
  """
  logits_BxLxV, _ = model_lib.GPT(cfg).apply({'params': params}, inputs_BxL)
  lp, best, top_ids, top_lp = log_probs(cfg, logits_BxLxV, targets_BxL, top_n)
  out = dict(logprob_BxL=lp, greedy_BxL=best)
  if top_n:
    out['top_logprob_BxLxN'], out['top_ids_BxLxN'] = top_lp, top_ids
  return out


class Scored(NamedTuple):
  """One row's scores, position t about token t: position 0 has none (nan, False, -1)."""
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


def rows_per_call(length: int, tokens: int = TOKENS_PER_CALL) -> int:
  """Rows of one call at input length `length`: a power of two within the token budget."""
  return 1 << max(0, (max(1, tokens // length)).bit_length() - 1)


def pack(rows: Sequence[Sequence[int]], length: int, batch: int):
  """(inputs [batch, length], targets [batch, length]) of rows of at most length + 1 tokens;
  missing rows and positions are id 0."""
  inputs = np.zeros((batch, length), np.int32)
  targets = np.zeros((batch, length), np.int32)
  for i, row in enumerate(rows):
    n = len(row) - 1
    inputs[i, :n] = row[:-1]
    targets[i, :n] = row[1:]
  return inputs, targets


def unpack(out: dict, lengths: Sequence[int]) -> list[Scored]:
  """`score`'s host arrays cut back to each row (`lengths`: tokens of each row)."""
  out = jax.device_get(out)
  result = []
  for i, n in enumerate(lengths):
    lp = np.concatenate([[np.nan], out['logprob_BxL'][i, :n - 1]]).astype(np.float32)
    greedy = np.concatenate([[False], out['greedy_BxL'][i, :n - 1]])
    if 'top_ids_BxLxN' in out:
      ids, tlp = out['top_ids_BxLxN'][i, :n - 1], out['top_logprob_BxLxN'][i, :n - 1]
      ids = np.concatenate([np.full((1, ids.shape[1]), -1, np.int32), ids])
      tlp = np.concatenate([np.full((1, tlp.shape[1]), np.nan, np.float32), tlp])
    else:
      ids, tlp = np.zeros((n, 0), np.int32), np.zeros((n, 0), np.float32)
    result.append(Scored(lp, greedy, ids, tlp))
  return result


def score_rows(cfg, params, rows: Sequence[Sequence[int]], top_n: int = 0,
               tokens: int = TOKENS_PER_CALL) -> list[Scored]:
  """Scores token lists of 1 to seq_len + 1 tokens each (the last one is only predicted).

  Rows are grouped by length bucket, longest first, `rows_per_call` to a call; returns one
  `Scored` per row, in the order given.
  """
  cfg = exact(cfg)
  limits = buckets(cfg.seq_len)
  by_bucket: dict[int, list[int]] = {}
  for i, row in enumerate(rows):
    if not 1 <= len(row) <= cfg.seq_len + 1:
      raise ValueError(f'row {i} has {len(row)} tokens; scoring takes 1 to {cfg.seq_len + 1}')
    length = next(b for b in limits if b >= max(len(row) - 1, 1))
    by_bucket.setdefault(length, []).append(i)
  result: list[Scored | None] = [None] * len(rows)
  for length in sorted(by_bucket, reverse=True):
    idx = by_bucket[length]
    batch = min(rows_per_call(length, tokens), 1 << (len(idx) - 1).bit_length())
    for start in range(0, len(idx), batch):
      part = idx[start:start + batch]
      inputs, targets = pack([rows[i] for i in part], length, batch)
      out = score(cfg, params, inputs, targets, top_n)
      for i, s in zip(part, unpack(out, [len(rows[i]) for i in part])):
        result[i] = s
  return result
