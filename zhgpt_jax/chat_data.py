"""Chat data for fine-tuning: conversations in, packed loss-masked rows and their loaders out.

`config.sft.data` is 'builtin' or a comma-separated list of .jsonl/.jsonl.gz files,
directories (searched recursively) and globs. A line holds one conversation in any of:
  * messages (smoltalk, OpenAI): {"messages": [{"role": "system|user|assistant", "content": ...}]}
  * ShareGPT:                    {"conversations": [{"from": "system|human|gpt", "value": ...}]}
  * Alpaca:                      {"instruction": ..., "input": ..., "output": ...} (+ "system")
All become one canonical conversation, a list of {'role', 'content'} dicts: an optional
system turn, then user and assistant turns alternating, starting with a user turn. Content
is normalised as pretraining text is (corpus.normalize); a trailing user turn is dropped. A
record that breaks these rules, bad JSON or invalid UTF-8 is skipped and counted per file
and reason (`SftStats.summary`).

A conversation is rendered in ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n` a turn,
exactly as tokenizer.CHAT_TEMPLATE renders it for HF `apply_chat_template`. One difference
by design: a special-token string typed inside content is read as plain text here, so data
cannot forge a turn. The loss covers only the assistants' content and their <|im_end|>.

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
import functools
import json
from typing import Iterator, Sequence

import grain
import numpy as np

from zhgpt_jax import corpus
from zhgpt_jax import data as data_lib
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.config import UserError

SUFFIXES = ('.jsonl', '.jsonl.gz')
ROLES = ('system', 'user', 'assistant')
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


def read_conversations(spec: str, stats: SftStats) -> Iterator[list[dict]]:
  """Canonical conversations of every file of `spec` (config.sft.data), skips counted in `stats`."""
  for path in corpus.resolve_paths(spec, 'config.sft.data', SUFFIXES):
    counts = stats.file(path)
    for raw in corpus.raw_lines(path):
      try:
        line = raw.decode('utf-8')
        if not line.strip():
          raise _Skip('blank')
        try:
          record = json.loads(line.lstrip('\ufeff'))
        except (ValueError, RecursionError):
          raise _Skip('malformed') from None
        conversation = parse_record(record)
      except UnicodeDecodeError:
        counts['invalid_utf8'] += 1
      except _Skip as skip:
        counts[skip.args[0]] += 1
      else:
        counts['kept'] += 1
        yield conversation


# ----------------------------------------------------------------------------- encoding

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
    contents = iter(self.plain.encode_batch(flat, add_special_tokens=False))
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


# ----------------------------------------------------------------------------- packing

def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Best-fit decreasing: rows of item indices whose lengths sum to at most `capacity`.

  Longest first (ties by index), each into the open row with the least room that fits it, else
  a new row. Deterministic; O(n log n) plus a sorted list of the distinct free-room values.
  """
  rows: list[list[int]] = []
  by_room: dict[int, list[int]] = collections.defaultdict(list)   # free room -> row ids
  rooms: list[int] = []                                            # sorted keys in use
  for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    n = lengths[i]
    if not 0 < n <= capacity:
      raise ValueError(f'item {i} has length {n}, not in [1, {capacity}]')
    j = bisect.bisect_left(rooms, n)
    if j < len(rooms):
      room = rooms[j]
      row = by_room[room].pop()
      if not by_room[room]:
        del rooms[j]
    else:
      room, row = capacity, len(rows)
      rows.append([])
    rows[row].append(i)
    left = room - n
    if left:
      if not by_room[left]:
        bisect.insort(rooms, left)
      by_room[left].append(row)
  return rows


def packed_rows(encoded: list[Encoded], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """Packs fitted conversations into rows: inputs, targets, weights, segment_ids, positions.

  All [rows, seq_len]; weights are uint8 (the loader casts them), the rest int32.
  """
  rows = pack([len(e.ids) - 1 for e in encoded], seq_len)
  n = len(rows)
  out = dict(inputs=np.full((n, seq_len), pad_id, np.int32),
             targets=np.full((n, seq_len), pad_id, np.int32),
             weights=np.zeros((n, seq_len), np.uint8),
             segment_ids=np.zeros((n, seq_len), np.int32),
             positions=np.zeros((n, seq_len), np.int32))
  for r, members in enumerate(rows):
    at = 0
    for seg, i in enumerate(members, start=1):
      e = encoded[i]
      m = len(e.ids) - 1
      out['inputs'][r, at:at + m] = e.ids[:-1]
      out['targets'][r, at:at + m] = e.ids[1:]
      out['weights'][r, at:at + m] = e.weights[1:]
      out['segment_ids'][r, at:at + m] = seg
      out['positions'][r, at:at + m] = np.arange(m)
      at += m
  return out


class PackedRows(grain.sources.RandomAccessDataSource):
  """Row i of precomputed packed arrays, as a dict of [seq_len] arrays."""

  def __init__(self, rows: dict[str, np.ndarray], name: str):
    self.rows, self.name = rows, name

  def __len__(self) -> int:
    return len(self.rows['inputs'])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[int(index)] for k, v in self.rows.items()}

  def __repr__(self) -> str:
    # grain checks a restored iterator against the source by repr; make it stable.
    return f'PackedRows({self.name}: {len(self)} rows of {self.rows["inputs"].shape[1]})'


def _to_batch(rows: dict[str, np.ndarray], shape) -> dict[str, np.ndarray]:
  """Stacked rows [n, L] -> [devices, accum, batch, L]; weights as float32."""
  return {k: v.reshape(shape).astype(np.float32 if k == 'weights' else np.int32)
          for k, v in rows.items()}


def train_loader(rows: dict[str, np.ndarray], name: str, *, per_device_batch: int,
                 grad_accum: int, local_devices: int, seed: int, process_index: int,
                 process_count: int, workers: int = 0, prefetch: int = 2) -> grain.IterDataset:
  """An endless grain dataset of shuffled packed rows, [devices, accum, batch, seq_len] each.

  As pretraining (`data.process_batches`): one global shuffled order, reshuffled every
  epoch, each process reading its own slice of every global batch.
  """
  source = PackedRows(rows, name)
  per_process = local_devices * grad_accum * per_device_batch
  if len(source) // process_count < per_process:
    raise UserError(f'sft data: {len(source)} packed rows cannot fill a batch of '
                    f'{per_process} rows on each of {process_count} processes; lower '
                    'train.per_device_batch or add data')
  shape = (local_devices, grad_accum, per_device_batch, rows['inputs'].shape[1])
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  return data_lib.process_batches(
      ds, len(source), per_process, functools.partial(_to_batch, shape=shape),
      process_index=process_index, process_count=process_count, workers=workers,
      prefetch=prefetch)


def eval_batches(rows: dict[str, np.ndarray], *, batch: int, local_devices: int,
                 process_index: int, process_count: int, max_batches: int = 0) -> Iterator[dict]:
  """One in-order pass over packed rows as [devices, batch, seq_len] dicts.

  Process p takes rows p, p + P, ... (`data.eval_rows`); zero-weight padding rows fill the
  last batch, and every process yields the same number of batches.
  """
  n, seq_len = rows['inputs'].shape
  per_batch = local_devices * batch
  for take in data_lib.eval_rows(n, per_batch, process_index, process_count, max_batches):
    out = {}
    for k, v in rows.items():
      x = np.zeros((per_batch, seq_len), np.float32 if k == 'weights' else np.int32)
      x[:len(take)] = v[take]
      out[k] = x.reshape(local_devices, batch, seq_len)
    yield out
