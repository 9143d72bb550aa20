"""The second pass of `prepare`: tokenize the kept documents and write the shards, resumably.

Blocks of the corpus (`documents.iter_blocks`) are parsed and tokenized by a pool of
processes (`pool.worker_pool`) and written in corpus order: every kept document's token ids
then <|endoftext|>, train and val apart, `shard_tokens` a file, a new file at each source's
start (so a shard holds one source, and the loader can mix sources by their shards).

Everything is written under <data>/.build-<key>/. Each time a shard is complete, the
writers' state (the shards so far with their sizes, counts, the next block) goes to
progress.json there; a run killed at any point (kill -9 included) and started again with
the same inputs cuts the open shards back to that state and continues from the next block,
printing from which shard, and its result is byte for byte that of an uninterrupted run.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import tqdm

from zhgpt_jax import builtin_corpus, corpus, dedup, documents, pool, scan
from zhgpt_jax import tokenizer as tokenizer_lib
from zhgpt_jax.config import UserError

SPLITS = ('train', 'val')


def _encode_block(block: documents.Block, removed: np.ndarray | None, eot: int,
                  dtype: str) -> dict:
  """A worker's tokens of one block, per split, with its counts and skips."""
  state = pool.worker_state()
  stats = corpus.CorpusStats()
  docs = documents.block_documents(block, state['data'], stats)
  if removed is not None and len(removed) != len(docs):
    raise UserError(f'{block.path} changed while prepare was reading it: run prepare again')
  texts = {s: [] for s in SPLITS}
  for i, (text, val) in enumerate(docs):
    code = 0 if removed is None else removed[i]
    if code:
      stats.skip(block.path, 'exact_dup' if code == dedup.EXACT else 'near_dup')
      continue
    texts['val' if val else 'train'].append(text)
    f = stats.file(block.path)
    f.documents += 1
    f.characters += len(text)
  out = dict(stats=stats)
  for split, batch in texts.items():
    flat = []
    for enc in state['tok'].encode_batch_fast(batch, add_special_tokens=False):
      flat.extend(enc.ids)
      flat.append(eot)
    out[split] = dict(tokens=np.array(flat, dtype=dtype), documents=len(batch),
                      characters=sum(map(len, batch)),
                      utf8_bytes=sum(len(t.encode('utf-8', 'surrogatepass')) for t in batch))
  return out


class ShardWriter:
  """Appends token arrays to shard_00000.bin, ... in `directory`, shard_tokens a file and a
  new file when the source changes. `state()` / `ShardWriter(..., state)` resume it."""

  def __init__(self, directory: str, dtype: np.dtype, shard_tokens: int, n_sources: int,
               state: dict | None = None):
    self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
    state = state or dict(shards=[], documents=0, characters=0, utf8_bytes=0,
                          source_tokens=[0] * n_sources, source_documents=[0] * n_sources)
    self.shards = [dict(s) for s in state['shards']]
    self.counts = {k: state[k] for k in ('documents', 'characters', 'utf8_bytes')}
    self.source_tokens = list(state['source_tokens'])
    self.source_documents = list(state['source_documents'])
    self.file = None
    os.makedirs(directory, exist_ok=True)
    listed = {s['name'] for s in self.shards}
    for name in os.listdir(directory):  # written after the state was saved
      if name.startswith('shard_') and name not in listed:
        os.remove(os.path.join(directory, name))
    if self.shards:  # cut the open shard back to the saved size
      self.file = open(os.path.join(directory, self.shards[-1]['name']), 'r+b')
      self.file.truncate(self.shards[-1]['tokens'] * dtype.itemsize)
      self.file.seek(0, os.SEEK_END)

  def write(self, part: dict, source: int) -> None:
    """Appends one block's tokens of this split (`_encode_block`'s part) from `source`."""
    tokens = part['tokens']
    for k in self.counts:
      self.counts[k] += part[k]
    self.source_tokens[source] += tokens.size
    self.source_documents[source] += part['documents']
    while tokens.size:
      last = self.shards[-1] if self.shards else None
      if last is None or last['tokens'] == self.shard_tokens or last['source'] != source:
        self._next(source)
      room = self.shard_tokens - self.shards[-1]['tokens']
      tokens[:room].astype(self.dtype, copy=False).tofile(self.file)
      self.shards[-1]['tokens'] += min(room, tokens.size)
      tokens = tokens[room:]

  def _next(self, source: int) -> None:
    if self.file is not None:
      self.file.close()
    name = f'shard_{len(self.shards):05d}.bin'
    self.file = open(os.path.join(self.directory, name), 'wb')
    self.shards.append(dict(name=name, tokens=0, source=source))

  def state(self) -> dict:
    """The writer's state, after flushing what it wrote to the OS (enough for kill -9)."""
    if self.file is not None:
      self.file.flush()
    return dict(shards=[dict(s) for s in self.shards], **self.counts,
                source_tokens=list(self.source_tokens),
                source_documents=list(self.source_documents))

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
      self.file = None


def _resume_state(build: str, key: str, dtype: np.dtype) -> dict | None:
  """progress.json of `build` if it is for `key` and every shard it lists is there whole."""
  state = scan.read_progress(build)
  if state is None or state.get('key') != key:
    return None
  for split in SPLITS:
    for shard in state['writers'][split]['shards']:
      path = os.path.join(build, split, shard['name'])
      if not os.path.isfile(path) or os.path.getsize(path) < shard['tokens'] * dtype.itemsize:
        return None
  return state


def build(config, tok, exclude: frozenset[str], build_dir: str, key: str, found: scan.Scan | None,
          n_sources: int, progress: bool) -> tuple[dict, corpus.CorpusStats]:
  """Tokenizes the corpus into build_dir/train and build_dir/val (resuming a killed build of
  the same key); `found` (the first pass) says which documents dedup removed; `exclude`: the
  builtin reviews kept out (`documents`). Returns
  ({split: writer state}, stats)."""
  data = config.data
  dtype = np.dtype('<u2') if tok.get_vocab_size() <= 1 << 16 else np.dtype('<u4')
  state = _resume_state(build_dir, key, dtype)
  if state is None:
    shutil.rmtree(build_dir, ignore_errors=True)
  stats = corpus.CorpusStats(text_field=data.text_field)
  if state is None and data.corpus == 'builtin':
    _ = list(builtin_corpus.documents(data, stats, exclude))  # the builtin skips, once
  if state is not None:
    stats = scan.stats_from_json(state['stats'], data.text_field)
    w = state['writers']
    print(f'prepare: resuming at block {state["next_block"]:,} of the corpus: train from shard '
          f'{len(w["train"]["shards"]) - 1} ({sum(s["tokens"] for s in w["train"]["shards"]):,} '
          f'tokens kept), val from shard {len(w["val"]["shards"]) - 1}', flush=True)
  writers = {s: ShardWriter(os.path.join(build_dir, s), dtype, data.shard_tokens, n_sources,
                            state and state['writers'][s]) for s in SPLITS}
  start = state['next_block'] if state else 0
  offsets = np.concatenate([[0], np.cumsum(found.block_docs)]) if found else None
  eot = tokenizer_lib.special_ids(tok).eos

  def jobs():
    for i, block in enumerate(documents.iter_blocks(data, exclude)):
      if i >= start:
        removed = found.removed[offsets[i]:offsets[i + 1]] if found else None
        yield (i, block), (block, removed, eot, dtype.str)

  total = scan.input_bytes(config)
  with pool.worker_pool(config, tok.to_str()) as submit, tqdm.tqdm(
      total=total, unit='B', unit_scale=True, disable=not progress, desc='shards') as bar:
    for (i, block), out in pool.ordered(submit, _encode_block, jobs(), 2 * pool.workers(config)):
      bar.update(block.size)
      stats.merge(out['stats'])
      before = [len(w.shards) for w in writers.values()]
      for s, w in writers.items():
        w.write(out[s], block.source)
      if before != [len(w.shards) for w in writers.values()]:  # a shard is complete
        scan.write_progress(build_dir, dict(key=key, next_block=i + 1, stats=stats.to_json(),
                                            writers={s: w.state() for s, w in writers.items()}))
  for w in writers.values():
    w.close()
  if not any(w.counts['documents'] for w in writers.values()):
    raise UserError(f'config.data.corpus={data.corpus!r}: no usable documents '
                    f'({stats.summary()})')
  return {s: w.state() for s, w in writers.items()}, stats

