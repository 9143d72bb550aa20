"""The `logprobs` objects of the server's replies, in OpenAI's shapes, from the engine's
raw log-probabilities (engine.Request: prompt_scores, token_logprobs, top).

Completions (legacy, as vLLM implements it): {tokens, token_logprobs, top_logprobs,
text_offset}, one entry a token of the returned text -- the echoed prompt's tokens first,
whose first has no log-probability (null) -- `top_logprobs` a {token: logprob} dict of the
N most likely tokens at that position. Chat: {content: [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}], refusal: null}.

A token's string is its text where its bytes are whole UTF-8 characters, else vLLM's
`bytes:\\xe4\\xb8` form (a byte-level token can be part of a character), so distinct tokens
keep distinct keys.
"""

from __future__ import annotations

from typing import Sequence

from zhgpt_jax import tokenizer as tok_lib


def token_text(tokenizer, token_id: int) -> str:
  data = tok_lib.token_bytes(tokenizer, token_id)
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    return 'bytes:' + ''.join(f'\\x{b:02x}' for b in data)


def text_offsets(tokenizer, ids: Sequence[int], start: int = 0) -> list[int]:
  """Where each token of `ids` starts in their decoded text, plus `start`."""
  return [start + len(tok_lib.decode(tokenizer, ids[:i])) for i in range(len(ids))]


def _top_dict(tokenizer, top: Sequence[tuple[int, float]]) -> dict[str, float]:
  out: dict[str, float] = {}
  for token_id, lp in top:
    key = token_text(tokenizer, token_id)
    out[key] = max(lp, out.get(key, float('-inf')))
  return out


def completion(tokenizer, prompt: Sequence[int] | None, prompt_scores, ids: Sequence[int],
               token_logprobs: Sequence[float], top, text_len: int) -> dict:
  """The legacy completions object of `prompt` (echoed; None: not) and the generated `ids`,
  keeping the tokens that start inside the returned text of `text_len` characters (a stop
  string can end it before the last generated token)."""
  all_ids = list(prompt or []) + list(ids)
  tokens, lps, tops = [], [], []
  if prompt:
    for i, token_id in enumerate(prompt):
      tokens.append(token_text(tokenizer, token_id))
      scored = prompt_scores[i] if i < len(prompt_scores) else None
      lps.append(None if scored is None else scored[0])
      tops.append(None if scored is None else _top_dict(tokenizer, scored[2]))
  for token_id, lp, t in zip(ids, token_logprobs, top):
    tokens.append(token_text(tokenizer, token_id))
    lps.append(lp)
    tops.append(_top_dict(tokenizer, t))
  offsets = text_offsets(tokenizer, all_ids)
  keep = len(prompt or []) + sum(o < text_len for o in offsets[len(prompt or []):])
  return dict(tokens=tokens[:keep], token_logprobs=lps[:keep], top_logprobs=tops[:keep],
              text_offset=offsets[:keep])


def chat(tokenizer, ids: Sequence[int], token_logprobs: Sequence[float], top,
         text_len: int) -> dict:
  """The chat completions object of the generated `ids` (those starting inside the text)."""
  offsets = text_offsets(tokenizer, ids)
  content = []
  for token_id, lp, t, offset in zip(ids, token_logprobs, top, offsets):
    if offset >= text_len:
      break
    entry = lambda i, x: dict(token=token_text(tokenizer, i), logprob=x,
                              bytes=list(tok_lib.token_bytes(tokenizer, i)))
    content.append(dict(entry(token_id, lp), top_logprobs=[entry(i, x) for i, x in t]))
  return dict(content=content, refusal=None)
