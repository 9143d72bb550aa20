"""`main.py chat`: a multi-turn terminal chat with a checkpoint.

The model comes from `checkpoint.load_model`, the prompt is the ChatML of the history
(`chatml.ChatEncoder`), and the reply streams from `sample.stream` with `config.sample`'s
options (`sample.options`), stopping at <|im_end|> or <|endoftext|>.
"""

from __future__ import annotations

import sys
from typing import Callable

import jax
import jax.numpy as jnp

from zhgpt_jax import checkpoint as ckpt_lib
from zhgpt_jax import sample
from zhgpt_jax.chatml import ChatEncoder
from zhgpt_jax.config import UserError


def chat_prompt(encoder: ChatEncoder, history: list[dict], max_tokens: int
                ) -> tuple[list[int], list[dict]]:
  """(prompt ids, kept history): the oldest exchanges dropped until the prompt fits max_tokens.

  A leading system turn is kept. Raises UserError when the last user turn alone does not fit.
  """
  system = history[:1] if history and history[0]['role'] == 'system' else []
  turns = history[len(system):]
  while turns:
    ids = encoder.prompt(system + turns)
    if len(ids) <= max_tokens:
      return ids, system + turns
    turns = turns[2:]
  raise UserError(f'the message does not fit the context of {max_tokens} prompt tokens')


def _stdout(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


def chat_loop(cfg, params, tokenizer, sample_cfg, *, read: Callable[[str], str] = input,
              write: Callable[[str], object] = _stdout) -> list[dict]:
  """The interactive chat on `read` (raises EOFError at the end) and `write`.

  Lines are user turns; '/reset' clears the history, '/exit' (or end of input) quits.
  Replies stream as they are generated. Returns the history at exit.
  """
  encoder = ChatEncoder(tokenizer)
  max_new = min(sample_cfg.max_new_tokens, cfg.seq_len // 2)
  options = sample.options(sample_cfg, tokenizer, max_new)
  history: list[dict] = []
  turn = 0
  while True:
    try:
      line = read('你: ').strip()
    except EOFError:
      write('\n')
      return history
    except UnicodeDecodeError:
      write('(that line is not UTF-8 text; skipped)\n')
      continue
    if line == '/exit':
      return history
    if line == '/reset':
      history = []
      write('(history cleared)\n')
      continue
    if not line:
      continue
    try:
      ids, history = chat_prompt(encoder, history + [{'role': 'user', 'content': line}],
                                 cfg.seq_len - max_new)
    except UserError as e:
      write(f'({e})\n')
      continue
    write('助手: ')
    chunks = sample.stream(cfg, params, ids, **dict(options, seed=sample_cfg.seed + turn))
    pieces = []
    for piece in sample.text_pieces(
        chunks, lambda new: tokenizer.decode(new, skip_special_tokens=True)):
      write(piece)
      pieces.append(piece)
    write('\n')
    history.append({'role': 'assistant', 'content': ''.join(pieces).strip() or '…'})
    turn += 1


def chat(workdir: str, sample_cfg, step: int | None = None, *, read=input,
         write=_stdout) -> None:
  """`main.py chat`: a multi-turn chat with the checkpoint of `workdir` (latest, or `step`)."""
  cfg, params, tokenizer, _, meta = ckpt_lib.load_model(workdir, step)
  write(f'{workdir} step {meta["step"]}: /reset clears the history, /exit quits\n')
  chat_loop(cfg, jax.tree.map(jnp.asarray, params), tokenizer, sample_cfg, read=read,
            write=write)
