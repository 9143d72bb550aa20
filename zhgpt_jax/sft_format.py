"""Chat data as token rows: conversations read, rendered in ChatML, fitted and packed.

Pure Python and numpy (no JAX): the pool processes that tokenize a big chat set import it.
`sft_batches` feeds the rows to training; `sft_shards` builds and caches them.

`config.sft.data` is 'builtin' or a comma-separated list of files, directories (searched
recursively; a split's files in a hub-style folder), globs and `hf:OWNER/NAME` datasets, read
as `formats` says: JSON lines, JSON arrays (optionally .gz/.zst) and parquet, whose columns
`messages`, `conversations`, `instruction`/`input`/`output`/`system` are read (smoltalk's
`messages` is list<struct<role, content>>). A record holds one conversation in any of:
  * messages (smoltalk, OpenAI): {"messages": [{"role": "system|user|assistant", "content": ...}]}
  * ShareGPT:                    {"conversations": [{"from": "system|human|gpt", "value": ...}]}
  * Alpaca:                      {"instruction": ..., "input": ..., "output": ...} (+ "system")
All become one canonical conversation, a list of {'role', 'content'} dicts: an optional
system turn, then user and assistant turns alternating, starting with a user turn. Content
is normalised as pretraining text is (corpus.normalize); a trailing user turn is dropped. A
record that breaks these rules, bad JSON or invalid UTF-8 is skipped and counted per file
and reason (`SftStats.summary`).

A conversation is encoded in ChatML by `chatml.ChatEncoder` (as the tokenizer's chat
template renders it; special-token strings inside content are plain text); the loss covers
only the assistants' content and their <|im_end|>.

A conversation of n tokens fills n - 1 positions of a row (inputs and targets are shifted by
one). One longer than the context is cut after its last whole assistant turn that fits
(`sft.long_policy='truncate'`; dropped if not even the first one fits) or dropped ('drop').
Conversations are packed into rows of model.seq_len by best-fit decreasing; `segment_ids`
(1, 2, ... within a row; 0 = padding) keep attention inside a conversation and `positions`
restart at 0 for each.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from zhgpt_jax import corpus, formats
from zhgpt_jax.chatml import ChatEncoder, Encoded
from zhgpt_jax.config import UserError

SUFFIXES = formats.CHAT_SUFFIXES
COLUMNS = ('messages', 'conversations', 'instruction', 'input', 'output', 'system')
_ROLE_OF = {'system': 'system', 'user': 'user', 'human': 'user', 'assistant': 'assistant',
            'gpt': 'assistant'}

# Skip reasons and how `SftStats.summary` words them.
_REASONS = {
    'invalid_utf8': 'invalid UTF-8',
    'malformed': 'malformed JSON',
    'blank': 'blank line',
    'unknown_format': 'not messages/conversations/alpaca',
    'bad_role': 'unknown role',
    'not_string': 'non-string content',
    'unencodable': 'with a lone surrogate (not encodable text)',
    'empty_turn': 'with an empty turn',
    'not_alternating': 'out of turn order',
    'no_assistant': 'without an assistant turn',
}


# ----------------------------------------------------------------------------- reading

class _Skip(Exception):
  """A record that is not a usable conversation; args[0] is a key of _REASONS."""


@dataclasses.dataclass
class SftStats:
  """Conversations kept and records skipped per file; conversations cut or dropped as too long."""
  files: dict[str, collections.Counter] = dataclasses.field(default_factory=dict)
  truncated: int = 0
  too_long: int = 0

  def file(self, path: str) -> collections.Counter:
    return self.files.setdefault(path, collections.Counter())

  def merge(self, other: 'SftStats') -> None:
    """Adds the counts of `other` (a part of the same data read apart) to these."""
    for path, counts in other.files.items():
      self.file(path).update(counts)
    self.truncated += other.truncated
    self.too_long += other.too_long

  @property
  def conversations(self) -> int:
    return sum(c['kept'] for c in self.files.values())

  @property
  def skipped(self) -> int:
    return sum(n for c in self.files.values() for r, n in c.items() if r != 'kept')

  def summary(self) -> str:
    """One line, e.g. '120 conversations; skipped 3 malformed JSON, 1 unknown role in a.jsonl'."""
    parts = [f'{self.conversations} conversations']
    for path, c in self.files.items():
      skips = ', '.join(f'{n} {_REASONS[r]}' for r, n in c.items() if r != 'kept')
      if skips:
        parts.append(f'skipped {skips} in {path}')
    if self.truncated or self.too_long:
      parts.append(f'{self.truncated} truncated and {self.too_long} dropped as longer than '
                   'the context')
    return '; '.join(parts)


def _turn(role, content) -> dict:
  if not isinstance(role, str) or role not in _ROLE_OF:
    raise _Skip('bad_role')
  if not isinstance(content, str):
    raise _Skip('not_string')
  if corpus.SURROGATE.search(content):
    raise _Skip('unencodable')
  content = corpus.normalize(content)
  if not content:
    raise _Skip('empty_turn')
  return {'role': _ROLE_OF[role], 'content': content}


def parse_record(record) -> list[dict]:
  """The canonical conversation of one decoded JSON record; raises _Skip(reason) if unusable."""
  if not isinstance(record, dict):
    raise _Skip('unknown_format')
  if isinstance(record.get('messages'), list):
    raw = [(m.get('role'), m.get('content')) if isinstance(m, dict) else (None, None)
           for m in record['messages']]
  elif isinstance(record.get('conversations'), list):
    raw = [(m.get('from', m.get('role')), m.get('value', m.get('content')))
           if isinstance(m, dict) else (None, None) for m in record['conversations']]
  elif 'instruction' in record and 'output' in record:
    instruction, extra = record['instruction'], record.get('input') or ''
    if not isinstance(instruction, str) or not isinstance(extra, str):
      raise _Skip('not_string')
    raw = [('system', record['system'])] if record.get('system') else []
    raw += [('user', f'{instruction}\n{extra}' if extra.strip() else instruction),
            ('assistant', record['output'])]
  else:
    raise _Skip('unknown_format')
  return check_order([_turn(role, content) for role, content in raw])


def check_order(turns: list[dict]) -> list[dict]:
  """`turns` without a trailing user turn; raises _Skip unless they alternate correctly."""
  body = turns[1:] if turns and turns[0]['role'] == 'system' else turns
  for i, t in enumerate(body):
    if t['role'] != ('user', 'assistant')[i % 2]:
      raise _Skip('not_alternating')
  if len(body) % 2:
    turns = turns[:-1]
  if len(body) < 2:
    raise _Skip('no_assistant')
  return turns


def parse_items(items: Iterable, counts: collections.Counter) -> Iterator[list[dict]]:
  """The canonical conversations of records (`formats.part_items`: a `formats.Bad` for a bad
  line); kept and skipped records counted in `counts`."""
  for record in items:
    try:
      if isinstance(record, formats.Bad):
        raise _Skip(record.reason)
      conversation = parse_record(record)
    except _Skip as skip:
      counts[skip.args[0]] += 1
    else:
      counts['kept'] += 1
      yield conversation


def parse_lines(lines: Iterable[bytes], counts: collections.Counter) -> Iterator[list[dict]]:
  """The canonical conversations of raw jsonl lines; kept and skipped lines counted in `counts`."""
  return parse_items(formats.json_lines(lines), counts)


def columns(path: str, names: list[str]) -> list[str]:
  """The chat columns of a parquet file; UserError (listing its columns) when it has none."""
  found = [c for c in COLUMNS if c in names]
  if not found:
    raise UserError(f'{path} has no column {", ".join(COLUMNS[:3])} (config.sft.data); '
                    f'its columns: {", ".join(names)}')
  return found


def data_paths(spec: str, split: str = 'train') -> list[str]:
  """The files of `spec` (config.sft.data), in order; UserError names an entry with none."""
  return formats.resolve_paths(spec, 'config.sft.data', SUFFIXES, split)


def file_parts(path: str, block_bytes: int = 1 << 20) -> Iterator[formats.Part]:
  """The Parts of one chat file, for `parse_items(formats.part_items(part), ...)`."""
  return formats.file_parts(path, columns, False, block_bytes)


def read_conversations(spec: str, stats: SftStats, split: str = 'train'
                       ) -> Iterator[list[dict]]:
  """Canonical conversations of every file of `spec` (config.sft.data), skips counted in `stats`."""
  for path in data_paths(spec, split):
    for part in file_parts(path):
      yield from parse_items(formats.part_items(part), stats.file(path))


# ----------------------------------------------------------------------------- fitting

def fit(enc: Encoded, max_tokens: int, policy: str) -> Encoded | None:
  """`enc` if it has at most max_tokens ids; else cut at a turn end ('truncate') or None."""
  if len(enc.ids) <= max_tokens:
    return enc
  if policy != 'truncate':
    return None
  keep = [i + 1 for i, (end, role) in enumerate(zip(enc.ends, enc.roles))
          if role == 'assistant' and end <= max_tokens]
  if not keep:
    return None
  k = keep[-1]
  n = enc.ends[k - 1]
  return Encoded(enc.ids[:n], enc.weights[:n], enc.ends[:k], enc.roles[:k])


def key_hash(text: str) -> int:
  """A 64-bit hash of `text` (blake2b), e.g. of a conversation's canonical JSON."""
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')


@dataclasses.dataclass
class Fitted:
  """A usable conversation as training sees it: its fitted encoding, split and key hash."""
  encoded: Encoded
  val: bool             # held out (corpus.is_val of its canonical JSON)
  hash: int             # key_hash of its canonical JSON: picks a val conversation if none is


def fitted_conversations(items: Iterable, path: str, encoder: ChatEncoder,
                         stats: SftStats, max_tokens: int, policy: str,
                         val_fraction: float) -> list[Fitted]:
  """The conversations of records `items` (`formats.part_items` of a Part of file `path`),
  in order, encoded (one batched tokenizer call) and fitted to max_tokens; skips, cuts and
  drops counted in `stats`."""
  conversations = list(parse_items(items, stats.file(path)))
  out = []
  for conversation, enc in zip(conversations, encoder.encode(conversations)):
    fitted = fit(enc, max_tokens, policy)
    if fitted is None:
      stats.too_long += 1
      continue
    stats.truncated += fitted is not enc
    key = json.dumps(conversation, ensure_ascii=False, sort_keys=True)
    out.append(Fitted(fitted, corpus.is_val(key, val_fraction), key_hash(key)))
  return out


def final_val(val: np.ndarray, hashes: np.ndarray) -> np.ndarray:
  """Each conversation's split (True = val) from `val` (by hash), with one rule for a small
  file: when no conversation is val and more than one is train, the train conversation of
  smallest `hashes` (the first of equals) is val, so there is always something to validate."""
  val = np.asarray(val, bool).copy()
  if not val.any() and len(val) > 1:
    val[int(np.argmin(hashes))] = True
  return val


def check_usable(spec: str, stats: SftStats, n_train: int, seq_len: int) -> None:
  """UserError when `spec` gave no usable conversation, or none fits for training."""
  if not stats.conversations:
    raise UserError(f'config.sft.data={spec!r}: no usable conversations ({stats.summary()})')
  if not n_train:
    raise UserError(f'config.sft.data={spec!r}: no conversation fits the context of {seq_len} '
                    f'tokens for training ({stats.summary()})')


def summary(stats: SftStats, seq_len: int, train: tuple[int, int, int], val: tuple[int, int]
            ) -> str:
  """The data line: stats, then (conversations, rows, tokens) of train and (conversations,
  rows) of val."""
  fill = train[2] / max(train[1] * seq_len, 1)
  return (f'{stats.summary()}; {train[0]} train conversations in {train[1]} rows of {seq_len} '
          f'({fill:.0%} filled), {val[0]} val in {val[1]} rows')


# ----------------------------------------------------------------------------- packing

def pack_members(lengths: Sequence[int] | np.ndarray, capacity: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Best-fit decreasing, as arrays: row r holds items members[starts[r]:starts[r + 1]].

  Longest first (ties by index), each into the open row with the least room that fits it, else
  a new row; a row's items in the order they went in. Deterministic; O(n log n) plus a sorted
  list of the distinct free-room values; ~30 bytes an item (no Python object per item).
  """
  lengths = np.asarray(lengths, np.int64).reshape(-1)
  n = len(lengths)
  order = np.argsort(-lengths, kind='stable')                     # longest first, ties by index
  row_of = np.empty(n, np.int64)                                  # the row of the k-th placed
  by_room: dict[int, list[int]] = collections.defaultdict(list)   # free room -> row ids
  rooms: list[int] = []                                           # sorted keys in use
  n_rows = 0
  for start in range(0, n, 1 << 16):                              # Python ints a chunk at a time
    chunk = order[start:start + (1 << 16)]
    for k, (i, size) in enumerate(zip(chunk.tolist(), lengths[chunk].tolist()), start):
      if not 0 < size <= capacity:
        raise ValueError(f'item {i} has length {size}, not in [1, {capacity}]')
      j = bisect.bisect_left(rooms, size)
      if j < len(rooms):
        room = rooms[j]
        row = by_room[room].pop()
        if not by_room[room]:
          del rooms[j]
      else:
        room, row, n_rows = capacity, n_rows, n_rows + 1
      row_of[k] = row
      left = room - size
      if left:
        if not by_room[left]:
          bisect.insort(rooms, left)
        by_room[left].append(row)
  placed = np.argsort(row_of, kind='stable')                      # by row, then as placed
  starts = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=n_rows))])
  return order[placed], starts


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """`pack_members` as a list of rows, each a list of item indices."""
  members, starts = pack_members(lengths, capacity)
  return [members[a:b].tolist() for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]


def fill_rows(rows: Sequence[Sequence[int]], seq_len: int, pad_id: int,
              item: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
  """Rows of packed items: inputs, targets, weights, segment_ids, positions, all [rows,
  seq_len]; weights uint8, the rest int32. `rows` lists each row's items; `item(i)` gives
  item i's (ids, weights), which fill len(ids) - 1 positions."""
  n = len(rows)
  out = dict(inputs=np.full((n, seq_len), pad_id, np.int32),
             targets=np.full((n, seq_len), pad_id, np.int32),
             weights=np.zeros((n, seq_len), np.uint8),
             segment_ids=np.zeros((n, seq_len), np.int32),
             positions=np.zeros((n, seq_len), np.int32))
  for r, members in enumerate(rows):
    at = 0
    for seg, i in enumerate(members, start=1):
      ids, weights = item(i)
      m = len(ids) - 1
      out['inputs'][r, at:at + m] = ids[:-1]
      out['targets'][r, at:at + m] = ids[1:]
      out['weights'][r, at:at + m] = weights[1:]
      out['segment_ids'][r, at:at + m] = seg
      out['positions'][r, at:at + m] = np.arange(m)
      at += m
  return out


def packed_rows(encoded: list[Encoded], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Packs fitted conversations, all in memory, into rows (`pack`, then `fill_rows`)."""
  rows = pack([len(e.ids) - 1 for e in encoded], seq_len)
  return fill_rows(rows, seq_len, pad_id, lambda i: (encoded[i].ids, encoded[i].weights))
