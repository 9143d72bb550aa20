"""ChatML token ids: conversations encoded as `tokenizer.CHAT_TEMPLATE` renders them.

A conversation is a list of {'role', 'content'} dicts (roles `ROLES`); each turn is
`<|im_start|>{role}\\n{content}<|im_end|>\\n`, exactly as HF `apply_chat_template` renders
the template our tokenizers carry. One difference by design: a special-token string typed
inside content is read as plain text here, so content cannot forge a turn. The weights mark
the assistants' content and their <|im_end|>: what SFT trains on (`sft_format`); the terminal
chat (`chat`) and the server (`serve`) continue `ChatEncoder.prompt`. No JAX: the SFT pool
workers import it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from zhgpt_jax import tokenizer as tok_lib

ROLES = ('system', 'user', 'assistant')


@dataclasses.dataclass
class Encoded:
  """A tokenized conversation: ids, the loss weight of each id as a target, turn ends."""
  ids: np.ndarray        # int32 [n]
  weights: np.ndarray    # uint8 [n]: 1 where predicting this id is trained (assistant spans)
  ends: list[int]        # ends[i] = len(ids) after turn i
  roles: list[str]


class ChatEncoder:
  """ChatML token ids of conversations, as tokenizer.CHAT_TEMPLATE renders them."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.plain = tok_lib.as_plain_text(tokenizer)
    self.im_start = tokenizer.token_to_id(tok_lib.IM_START)
    self.im_end = tokenizer.token_to_id(tok_lib.IM_END)
    # The header ends in '\n' and content starts with a non-space (it is stripped), so the
    # byte-level pre-tokenizer splits there: encoding the two apart equals encoding them joined.
    self.header = {r: [self.im_start] + self.plain.encode(r + '\n', add_special_tokens=False).ids
                   for r in ROLES}
    self.newline = self.plain.encode('\n', add_special_tokens=False).ids

  def encode(self, conversations: Sequence[list[dict]]) -> list[Encoded]:
    """Encodes many conversations (one batched tokenizer call)."""
    flat = [t['content'] for c in conversations for t in c]
    contents = iter(self.plain.encode_batch_fast(flat, add_special_tokens=False))
    out = []
    for conversation in conversations:
      ids, weights, ends = [], [], []
      for turn in conversation:
        body = next(contents).ids + [self.im_end]
        w = 1 if turn['role'] == 'assistant' else 0
        head = self.header[turn['role']]
        ids += head + body + self.newline
        weights += [0] * len(head) + [w] * len(body) + [0] * len(self.newline)
        ends.append(len(ids))
      out.append(Encoded(np.array(ids, np.int32), np.array(weights, np.uint8), ends,
                         [t['role'] for t in conversation]))
    return out

  def prompt(self, conversation: list[dict]) -> list[int]:
    """Token ids of `conversation` followed by the assistant header: what generation continues."""
    ids = self.encode([conversation])[0].ids.tolist() if conversation else []
    return ids + self.header['assistant']
