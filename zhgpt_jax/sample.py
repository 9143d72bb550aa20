"""Text generation with the KV cache: greedy, temperature, top-k, top-p, repetition penalty.

A batch of prompts is right-aligned in P prompt slots (row b's pad occupies slots [0, pad_b),
masked out of attention; position = slot - pad_b), prefilled in one call, then decoded one
token a step inside a `lax.while_loop` that stops when every row has hit a stop id. New
tokens go to slots P, P+1, ... of an S-slot cache.

Nothing recompiles per prompt length: P is bucketed to a power of two (>= 16) and S (P +
max_new_tokens) rounded up to a multiple of 64; the sampling knobs (temperature, top_k,
top_p, penalty, seed) are traced values. Static, so one program each: the batch size, the
buckets, and the program's kind: greedy or sampled, and whether top-k/top-p filtering (a
sort over V each step) is on.

Streaming runs the same loop `chunk` tokens per call: `stream` yields each chunk's tokens,
`stream_text` the text they complete (a byte-level token can end mid-character).

Shape letters: B batch, P prompt slots, S cache slots, V vocab (padded).
"""

from __future__ import annotations

import functools
import sys
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zhgpt_jax import model as model_lib
from zhgpt_jax.tokenizer import decode, special_ids
from zhgpt_jax.config import UserError

# Our tokenizers' stop tokens; any tokenizer's are `tokenizer.special_ids(tok).stop`.
STOP_TOKENS = ('<|endoftext|>', '<|im_end|>')


class Mode(NamedTuple):
  """The static choices: each combination is one compiled program."""
  greedy: bool
  filters: bool
  penalty: bool = True   # False: no repetition penalty, so no seen-token set to keep per step


# ---------------------------------------------------------------- sampling (pure, per step)

def repetition_penalty_logits(logits_BxV, seen_BxV, penalty):
  """CTRL's penalty: a seen token's logit is divided by `penalty` if positive, else multiplied.

  Dividing every logit would raise negative ones; this way a penalty > 1 always lowers them.
  """
  penalized_BxV = jnp.where(logits_BxV > 0, logits_BxV / penalty, logits_BxV * penalty)
  return jnp.where(seen_BxV, penalized_BxV, logits_BxV)


def filter_logits(logits_BxV, top_k, top_p):
  """Top-k, then nucleus (top-p) over what top-k left: cut tokens get -inf.

  top_k=0 and top_p=1 turn them off. Nucleus keeps the fewest highest tokens whose mass
  reaches top_p (always at least one). One sort yields both cutoffs as a logit threshold,
  so a token tied with the last kept one is kept too.
  """
  v = logits_BxV.shape[-1]
  rank_V = jnp.arange(v)
  in_k_V = rank_V < jnp.where(top_k > 0, top_k, v)
  sorted_BxV = jnp.where(in_k_V, jnp.flip(jnp.sort(logits_BxV, axis=-1), axis=-1), -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  above_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV     # mass ranked strictly higher
  # top_p = 1 must keep the tail even where rounding lets the cumulative sum reach 1 early.
  keep_BxV = in_k_V & ((above_BxV < top_p) | (top_p >= 1.0))
  last_Bx1 = jnp.sum(keep_BxV, axis=-1, keepdims=True) - 1
  cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, last_Bx1, axis=-1)
  return jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)


def sampling_logits(logits_BxV, seen_BxV, temperature, top_k=0, top_p=1.0,
                    repetition_penalty=1.0, real_vocab=None):
  """The logits whose softmax is the sampling distribution; their argmax is greedy's pick.

  In HF's order: vocab padding (ids >= real_vocab) to -inf, repetition penalty over
  `seen_BxV`, temperature (0 = greedy: left unscaled), top-k, top-p.
  """
  x_BxV = mask_padding(logits_BxV, real_vocab or logits_BxV.shape[-1])
  x_BxV = repetition_penalty_logits(x_BxV, seen_BxV, repetition_penalty)
  x_BxV = x_BxV / jnp.where(temperature > 0, temperature, 1.0)
  return filter_logits(x_BxV, top_k, top_p)


def mask_padding(logits_BxV, real_vocab: int):
  return jnp.where(jnp.arange(logits_BxV.shape[-1]) < real_vocab, logits_BxV, -jnp.inf)


def row_keys(key, step, rows: int):
  """A key per (step, row): a prompt's samples do not depend on the batch around it or on how
  streaming chunks the steps."""
  step_key = jax.random.fold_in(key, step)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, jnp.arange(rows))


def argmax(x_BxV):
  """jnp.argmax over the last axis (the first index of the largest value, or of the first
  NaN), as two plain reductions: XLA's CPU backend runs jnp.argmax's (value, index) pair
  reduction as a scalar loop, ~6x slower at V = 8k, a seventh of a tiny model's decode step."""
  v = x_BxV.shape[-1]
  hit_BxV = (x_BxV == jnp.max(x_BxV, axis=-1, keepdims=True)) | jnp.isnan(x_BxV)
  return jnp.min(jnp.where(hit_BxV, jnp.arange(v), v), axis=-1).astype(jnp.int32)


def choose(cfg, mode: Mode, logits_BxV, seen_BxV, opts: dict, keys_B):
  """The next token per row: `sampling_logits`, skipping what `mode` turns off.

  opts' penalty, temperature, top_k and top_p are scalars, or [B, 1] for one value a row.
  """
  x_BxV = mask_padding(logits_BxV, cfg.real_vocab_size)
  if mode.penalty:   # a traced value: one program serves every penalty, 1 included
    x_BxV = repetition_penalty_logits(x_BxV, seen_BxV, opts['penalty'])
  if mode.greedy:
    return argmax(x_BxV)
  x_BxV = x_BxV / opts['temperature']
  if mode.filters:
    x_BxV = filter_logits(x_BxV, opts['top_k'], opts['top_p'])
  return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)


def _pick(cfg, mode: Mode, logits_BxV, seen_BxV, opts, step):
  keys_B = row_keys(opts['key'], step, logits_BxV.shape[0])
  return choose(cfg, mode, logits_BxV, seen_BxV, opts, keys_B)


def hidden_call(cfg, params, tokens_BxL, positions_BxL, cache, kv_mask_BxS):
  """One forward pass through the KV cache up to the head: (final hidden states [B, L, D],
  the head [D, V], the updated cache). A prefill needs the logits of one position a row,
  and the head (V x D a token) outweighs a small model's layers: `model_lib.head_logits` of
  the rows needed."""
  hidden_BxLxD, aux = model_lib.GPT(cfg).apply(
      {'params': params}, tokens_BxL, positions_BxL=positions_BxL, cache=cache,
      kv_mask_BxS=kv_mask_BxS, hidden=True)
  return hidden_BxLxD, aux['head_DxV'], aux['cache']


def model_call(cfg, params, tokens_BxL, positions_BxL, cache, kv_mask_BxS):
  """`hidden_call` with the head at every position: (float32 logits [B, L, V], the cache)."""
  hidden_BxLxD, head_DxV, cache = hidden_call(cfg, params, tokens_BxL, positions_BxL, cache,
                                              kv_mask_BxS)
  return model_lib.head_logits(cfg, hidden_BxLxD, head_DxV), cache


# ---------------------------------------------------------------- the decoding loop (jitted)

def _kv_mask(pad_B, size: int):
  return jnp.arange(size)[None, :] >= pad_B[:, None]


def _append(cfg, mode: Mode, state: dict, opts: dict) -> dict:
  """Picks a token from state's logits and writes it at the cache's write index."""
  tok_B = _pick(cfg, mode, state['logits_BxV'], state['seen_BxV'], opts, state['step'])
  done_B = state['done_B']
  stop_B = ~done_B & jnp.any(tok_B[:, None] == opts['stops'][None, :], axis=-1)
  slot = state['cache'][0]['index']
  b = tok_B.shape[0]
  return dict(
      state,
      tokens_BxS=jax.lax.dynamic_update_slice_in_dim(state['tokens_BxS'], tok_B[:, None], slot, 1),
      seen_BxV=(state['seen_BxV'].at[jnp.arange(b), tok_B].set(True) if mode.penalty
                else state['seen_BxV']),
      done_B=done_B | stop_B,
      length_B=state['length_B'] + (~done_B & ~stop_B),
      step=state['step'] + 1)


@functools.partial(jax.jit, static_argnames=('cfg', 'mode', 'size'))
def _start(cfg, mode: Mode, size: int, params, prompt_BxP, pad_B, opts) -> dict:
  """Prefills an S=`size`-slot cache with the right-aligned prompts; picks the first token."""
  b, p = prompt_BxP.shape
  slots_P = jnp.arange(p)
  real_BxP = slots_P[None, :] >= pad_B[:, None]
  # Pad slots get position 0 (any valid index): they are masked, but must stay finite.
  positions_BxP = jnp.maximum(slots_P[None, :] - pad_B[:, None], 0)
  cache = model_lib.init_cache(cfg, b, size, jnp.dtype(cfg.dtype))
  hidden_BxPxD, head_DxV, cache = hidden_call(cfg, params, prompt_BxP, positions_BxP, cache,
                                              _kv_mask(pad_B, size))
  # Pad slots scatter to the out-of-range id V and are dropped.
  seen_ids_BxP = jnp.where(real_BxP, prompt_BxP, cfg.vocab_size)
  seen_BxV = jnp.zeros((b, cfg.vocab_size), bool).at[
      jnp.arange(b)[:, None], seen_ids_BxP].set(True, mode='drop')
  state = dict(cache=cache, pad_B=pad_B, seen_BxV=seen_BxV,
               tokens_BxS=jnp.zeros((b, size), jnp.int32).at[:, :p].set(prompt_BxP),
               logits_BxV=model_lib.head_logits(cfg, hidden_BxPxD[:, -1], head_DxV),
               done_B=jnp.zeros(b, bool), length_B=jnp.zeros(b, jnp.int32), step=jnp.int32(0))
  return _append(cfg, mode, state, opts)


@functools.partial(jax.jit, static_argnames=('cfg', 'mode'), donate_argnames=('state',))
def _advance(cfg, mode: Mode, params, state: dict, opts: dict, until) -> dict:
  """Single-token steps until `until` tokens are out or every row has stopped."""
  size = state['tokens_BxS'].shape[1]

  def unfinished(s):
    return (s['step'] < until) & ~jnp.all(s['done_B'])

  def step(s):
    slot = s['cache'][0]['index']   # the last token's slot: it has no keys/values yet
    tok_Bx1 = jax.lax.dynamic_slice_in_dim(s['tokens_BxS'], slot, 1, axis=1)
    logits_Bx1xV, cache = model_call(cfg, params, tok_Bx1, (slot - s['pad_B'])[:, None],
                                     s['cache'], _kv_mask(s['pad_B'], size))
    return _append(cfg, mode, dict(s, cache=cache, logits_BxV=logits_Bx1xV[:, 0]), opts)

  return jax.lax.while_loop(unfinished, step, state)


# ---------------------------------------------------------------- host side

def bucket(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _fit(cfg, prompt: Sequence[int], max_new_tokens: int, sliding: bool) -> list[int]:
  """`prompt`, checked; with `sliding`, cut to its last seq_len - max_new_tokens tokens."""
  prompt = [int(t) for t in prompt]
  if not prompt:
    raise UserError('empty prompt: give at least one token (e.g. <|endoftext|>)')
  bad = [t for t in prompt if not 0 <= t < cfg.real_vocab_size]
  if bad:
    raise UserError(f'prompt token id {bad[0]} is outside the vocabulary '
                    f'[0, {cfg.real_vocab_size})')
  room = cfg.seq_len - max_new_tokens
  if len(prompt) <= room:
    return prompt
  if room < 1:
    raise UserError(f'max_new_tokens={max_new_tokens} leaves no room for a prompt in the '
                    f"model's context of seq_len={cfg.seq_len}; lower max_new_tokens")
  if sliding:
    return prompt[-room:]
  raise UserError(f'prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds the '
                  f"model's context (seq_len={cfg.seq_len}); shorten the prompt, lower "
                  f'max_new_tokens, or set sample.sliding=True (sliding=True in Python) to keep '
                  f'its last {room} tokens')


def check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> None:
  if max_new_tokens < 1:
    raise UserError(f'max_new_tokens={max_new_tokens}: must be > 0')
  if temperature < 0:
    raise UserError(f'temperature={temperature}: must be >= 0 (0 = greedy)')
  if top_k < 0:
    raise UserError(f'top_k={top_k}: must be >= 0 (0 = off)')
  if not 0.0 < top_p <= 1.0:
    raise UserError(f'top_p={top_p}: must be in (0, 1]')
  if repetition_penalty <= 0:
    raise UserError(f'repetition_penalty={repetition_penalty}: must be > 0 (1 = off)')


def stop_array(stop_ids: Sequence[int]) -> np.ndarray:
  # Padded with -1 (never a token) to a multiple of 4: a new count rarely recompiles.
  stop = list(stop_ids)
  return np.array(stop + [-1] * (_round_up(max(len(stop), 1), 4) - len(stop)), np.int32)


class _Run(NamedTuple):
  mode: Mode
  opts: dict
  prompt_slots: int
  max_new_tokens: int


def _begin(cfg, params, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
           repetition_penalty=1.0, stop_ids=(), seed=0, sliding=False) -> tuple[dict, _Run]:
  """Checks and pads the prompts, prefills, and picks the first token: (state, run)."""
  check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
  if not prompts:
    raise UserError('no prompts')
  prompts = [_fit(cfg, p, max_new_tokens, sliding) for p in prompts]
  p = bucket(max(len(x) for x in prompts))
  size = _round_up(p + max_new_tokens, 64)
  pad_B = np.array([p - len(x) for x in prompts], np.int32)
  prompt_BxP = np.zeros((len(prompts), p), np.int32)
  for row, (x, pad) in enumerate(zip(prompts, pad_B)):
    prompt_BxP[row, pad:] = x
  greedy = temperature == 0
  mode = Mode(greedy=greedy, filters=not greedy and (top_k > 0 or top_p < 1.0),
              penalty=repetition_penalty != 1.0)
  opts = dict(temperature=np.float32(temperature), top_k=np.int32(top_k),
              top_p=np.float32(top_p), penalty=np.float32(repetition_penalty),
              stops=stop_array(stop_ids), key=jax.random.PRNGKey(seed))
  state = _start(cfg, mode, size, params, prompt_BxP, pad_B, opts)
  return state, _Run(mode, opts, p, max_new_tokens)


def generate(cfg, params, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (), seed: int = 0,
             sliding: bool = False) -> list[list[int]]:
  """Continues each prompt (token ids) by up to `max_new_tokens` tokens.

  temperature 0 is greedy; top_k 0 and top_p 1 are off; repetition_penalty 1 is off. A row
  ends at its first id in `stop_ids`, which is not returned. A prompt longer than
  seq_len - max_new_tokens raises UserError, unless `sliding` keeps only its last
  seq_len - max_new_tokens tokens. Returns the new tokens of each prompt.
  """
  state, run = _begin(cfg, params, prompts, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      repetition_penalty=repetition_penalty, stop_ids=stop_ids, seed=seed,
                      sliding=sliding)
  state = _advance(cfg, run.mode, params, state, run.opts, max_new_tokens)
  tokens_BxS, length_B = jax.device_get((state['tokens_BxS'], state['length_B']))
  p = run.prompt_slots
  return [row[p:p + n].tolist() for row, n in zip(tokens_BxS, length_B)]


def stream(cfg, params, prompt: list[int], *, chunk: int = 16, **options) -> Iterator[list[int]]:
  """`generate` for one prompt, yielding its new tokens `chunk` decoding steps at a time.

  Takes generate's keyword options; the chunks concatenate to generate's result. Options
  are checked and the prompt prefilled here, so a UserError comes from the call itself.
  """
  if chunk < 1:
    raise UserError(f'chunk={chunk}: must be > 0')
  state, run = _begin(cfg, params, [prompt], **options)
  return _chunks(cfg, params, state, run, chunk)


def _chunks(cfg, params, state: dict, run: _Run, chunk: int) -> Iterator[list[int]]:
  sent, until, p = 0, 0, run.prompt_slots
  while True:
    until = min(until + chunk, run.max_new_tokens)
    state = _advance(cfg, run.mode, params, state, run.opts, until)
    row_S, length, done, step = jax.device_get(
        (state['tokens_BxS'][0], state['length_B'][0], state['done_B'][0], state['step']))
    if length > sent:
      yield row_S[p + sent:p + length].tolist()
      sent = int(length)
    if done or step >= run.max_new_tokens:
      return


# ---------------------------------------------------------------- text

def encode_prompt(tokenizer, text: str) -> list[int]:
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  if not ids:   # an empty prompt: start from a document boundary, as GPT-2 does
    ids = [special_ids(tokenizer).eos]
  return ids


def options(sample_cfg, tokenizer, max_new_tokens: int,
            stop_tokens: Sequence[str] | None = None) -> dict:
  """generate's keyword options from `config.sample`, max_new_tokens and stop-token strings
  (None: the tokenizer's end of text and <|im_end|>)."""
  stop_ids = (list(special_ids(tokenizer).stop) if stop_tokens is None
              else [tokenizer.token_to_id(t) for t in stop_tokens])
  return dict(max_new_tokens=max_new_tokens, temperature=sample_cfg.temperature,
              top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
              repetition_penalty=sample_cfg.repetition_penalty, seed=sample_cfg.seed,
              stop_ids=[i for i in stop_ids if i is not None],
              sliding=sample_cfg.get('sliding', False))


def _options(cfg, tokenizer, prompts: list[list[int]], sample_cfg,
             stop_tokens: Sequence[str] | None) -> dict:
  """`options`, with max_new_tokens fitted to the longest of `prompts` (`_max_new`)."""
  max_new = _max_new(cfg, prompts, sample_cfg.max_new_tokens, sample_cfg.get('sliding', False))
  return options(sample_cfg, tokenizer, max_new, stop_tokens)


def _max_new(cfg, prompts: list[list[int]], max_new_tokens: int, sliding: bool = False) -> int:
  """max_new_tokens, lowered to what the context leaves the longest prompt, if it leaves any.

  config.sample's default (128) suits GPT-2's 1024 tokens, not a small model's context
  (tiny.py: 128). With `sliding` the prompt is cut instead; a prompt that fills the context
  is left to generate to report.
  """
  room = cfg.seq_len - max(len(p) for p in prompts)
  return max_new_tokens if sliding or room < 1 else min(max_new_tokens, room)


def complete_suffix(text: str, sent: int) -> str:
  """What of `text` after its first `sent` characters is safe to print now.

  Trailing U+FFFD are held back: they may be a character whose remaining bytes are still
  to come, and will decode to it once they do.
  """
  return text[sent:].rstrip('\ufffd')


def generate_text(cfg, params, tokenizer, prompts: list[str], sample_cfg,
                  stop_tokens: Sequence[str] | None = None) -> list[str]:
  """The continuation of each prompt, as text; `sample_cfg` is `config.sample`.

  `tokenizer` is a `tokenizers.Tokenizer`; generation ends at any of `stop_tokens` (not
  included; None: the tokenizer's end of text and <|im_end|>), and after sample_cfg.max_new_tokens tokens or where the model's context ends,
  whichever comes first. `sample_cfg.sliding`, where present, is generate's `sliding`.
  """
  out = generate_ids(cfg, params, tokenizer, prompts, sample_cfg, stop_tokens)
  return [decode(tokenizer, x) for x in out]


def generate_ids(cfg, params, tokenizer, prompts: list[str], sample_cfg,
                 stop_tokens: Sequence[str] | None = None) -> list[list[int]]:
  """`generate_text`'s new tokens, as ids."""
  ids = [encode_prompt(tokenizer, p) for p in prompts]
  return generate(cfg, params, ids, **_options(cfg, tokenizer, ids, sample_cfg, stop_tokens))


def longest_run(ids: Sequence[int]) -> int:
  """The most times one token repeats back to back: degenerate repetition shows as a long run."""
  best = run = 0
  for i, x in enumerate(ids):
    run = run + 1 if i and x == ids[i - 1] else 1
    best = max(best, run)
  return best


def stream_text(cfg, params, tokenizer, prompt: str, sample_cfg,
                stop_tokens: Sequence[str] | None = None, chunk: int = 16) -> Iterator[str]:
  """`generate_text` for one prompt, yielding text pieces as they are generated.

  Each piece is whole characters (`text_pieces`). The pieces concatenate to generate_text's
  result.
  """
  prompt_ids = encode_prompt(tokenizer, prompt)
  chunks = stream(cfg, params, prompt_ids, chunk=chunk,
                  **_options(cfg, tokenizer, [prompt_ids], sample_cfg, stop_tokens))
  return text_pieces(chunks, lambda ids: decode(tokenizer, ids))


def text_pieces(chunks: Iterator[list[int]], decode_fn) -> Iterator[str]:
  """The text of streamed token chunks, as pieces of whole characters.

  The accumulated tokens are decoded (`decode_fn`) after every chunk and the new complete
  suffix is yielded; the pieces concatenate to the decoded text of all tokens.
  """
  ids, text, sent = [], '', 0
  for new in chunks:
    ids.extend(new)
    text = decode_fn(ids)
    piece = complete_suffix(text, sent)
    if piece:
      sent += len(piece)
      yield piece
  if text[sent:]:   # what is still held back at the end is really invalid bytes
    yield text[sent:]


def sample_workdir(workdir: str, prompts: list[str], sample_cfg, step: int | None = None,
                   write=None) -> list[str]:
  """`main.py sample`: one prompt streams to `write` as it is generated; several print in turn."""
  from zhgpt_jax import checkpoint
  write = write or (lambda s: print(s, end='', flush=True))
  cfg, params, tokenizer, _, _ = checkpoint.load_model(workdir, step)
  params = jax.tree.map(jnp.asarray, params)
  ids = [encode_prompt(tokenizer, p) for p in prompts]
  fits = _max_new(cfg, ids, sample_cfg.max_new_tokens, sample_cfg.get('sliding', False))
  if fits < sample_cfg.max_new_tokens:
    print(f'sample: {fits} new tokens at most (max_new_tokens={sample_cfg.max_new_tokens}): '
          f"the model's context is {cfg.seq_len} tokens and the prompt takes "
          f'{max(map(len, ids))}', file=sys.stderr, flush=True)
  if len(prompts) == 1:
    write(prompts[0])
    pieces = []
    for piece in stream_text(cfg, params, tokenizer, prompts[0], sample_cfg):
      pieces.append(piece)
      write(piece)
    write('\n')
    return [''.join(pieces)]
  texts = generate_text(cfg, params, tokenizer, prompts, sample_cfg)
  for prompt, text in zip(prompts, texts):
    write(f'{prompt}{text}\n')
  return texts
