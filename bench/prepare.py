"""Data-preparation benchmark: the builtin corpus, or synthetic corpora at scale.

  python bench/prepare.py [--vocab 8000] [--workers 0,1] [--train_chars 1000000,2000000]
  python bench/prepare.py --scale 0.25,1,3 [--kill_trials 5]     (see bench/prepare_scale.py)
  python bench/prepare.py --formats 1 [--repeats 2]  jsonl vs jsonl.zst vs parquet (bench/prepare_formats.py)

1. Shard-stage throughput: `dataprep.prepare` with an already trained tokenizer (so it reads
   the corpus, tokenizes in parallel and writes shards), in MB/s of the documents' UTF-8
   bytes, next to raw `Tokenizer.encode_batch` (and `encode_batch_fast`) on the same
   documents already in memory; ratio = pipeline / raw. Best of --repeats runs each.
2. Tokenizer-training peak memory: a child process per --train_chars value trains on at most
   that many characters and reports its peak RSS (VmHWM in /proc/self/status: the Rust
   trainer's memory is invisible to tracemalloc, and on Linux ru_maxrss carries the parent's
   peak across fork+exec).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zhgpt_jax import corpus, documents  # pylint: disable=wrong-import-position
from zhgpt_jax import dataprep  # pylint: disable=wrong-import-position
from zhgpt_jax import tokenizer as tokenizer_lib  # pylint: disable=wrong-import-position
from zhgpt_jax.config import default_config  # pylint: disable=wrong-import-position
import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)


def _peak_mb() -> float:
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      return next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) / 1024
  except (OSError, StopIteration):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_child(max_chars: int, vocab: int) -> None:
  """Trains on the builtin train split and prints {seconds, before_mb, peak_mb} as JSON."""
  before = _peak_mb()
  docs = documents.iter_documents(default_config().data, 'train', corpus.CorpusStats())
  with timing.Timer() as t:
    tokenizer_lib.train_tokenizer(docs, vocab, max_train_chars=max_chars)
  print(json.dumps(dict(seconds=t.seconds, before_mb=before,
                        peak_mb=_peak_mb())))


def _train_memory(max_chars: int, vocab: int) -> dict:
  out = subprocess.run([sys.executable, __file__, '--child_train', str(max_chars),
                        '--vocab', str(vocab)], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--vocab', type=int, default=8000)
  parser.add_argument('--workers', default='0,1',
                      help='tokenize_workers values to time (0 = a process per core, 1 = one '
                      'process, Rust threads on all cores)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--train_chars', default='1000000,2000000')
  parser.add_argument('--child_train', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--scale', default='', help='GB sizes of synthetic corpora (scale mode)')
  parser.add_argument('--formats', type=float, default=0,
                      help='GB of a synthetic corpus read as jsonl, jsonl.zst and parquet')
  parser.add_argument('--kill_trials', type=int, default=5)
  parser.add_argument('--scale_dir', default='/tmp/zhgpt_scale')
  parser.add_argument('--phases', default='scan,prepare', help='scale mode: scan and/or prepare')
  parser.add_argument('--results', default='results.json', help='scale mode: file in scale_dir')
  args = parser.parse_args()
  if args.formats:
    import prepare_formats  # pylint: disable=import-outside-toplevel
    prepare_formats.main(args.formats, args.repeats, args.scale_dir)
    return
  if args.scale:
    import prepare_scale  # pylint: disable=import-outside-toplevel
    prepare_scale.main([float(x) for x in args.scale.split(',')], args.vocab, args.kill_trials,
                       args.scale_dir, tuple(args.phases.split(',')), args.results)
    return
  if args.child_train:
    _train_child(args.child_train, args.vocab)
    return

  config = default_config('tiny')
  config.tokenizer.vocab_size = args.vocab
  modes = [int(w) for w in args.workers.split(',')]
  with tempfile.TemporaryDirectory() as tmp:
    with timing.Timer() as t:
      docs = list(documents.iter_documents(config.data, 'train', corpus.CorpusStats()))
      tok = tokenizer_lib.train_tokenizer(docs, args.vocab,
                                          max_train_chars=config.tokenizer.max_train_chars)
    print(f'tokenizer: vocab {tok.get_vocab_size()} trained on {sum(map(len, docs)):,} '
          f'characters in {t.seconds:.1f} s')
    tok_dir = os.path.join(tmp, 'tok')
    tokenizer_lib.save_tokenizer(tok, tok_dir)
    config.tokenizer.path = tok_dir

    texts = list(documents.iter_documents(config.data, 'all', corpus.CorpusStats()))
    n_bytes = sum(len(t.encode('utf-8')) for t in texts)
    plain = tokenizer_lib.as_plain_text(tok)
    best = {**{f'pipeline workers={w}': float('inf') for w in modes},
            'encode_batch': float('inf'), 'encode_batch_fast': float('inf')}
    for r in range(args.repeats):  # interleaved, so load from elsewhere hits all alike
      for w in modes:
        config.data.tokenize_workers = w
        config.data.cache_dir = os.path.join(tmp, f'data{r}-{w}')
        with contextlib.redirect_stdout(io.StringIO()):
          summary = dataprep.prepare(config, tmp, progress=False)
        assert sum(summary.utf8_bytes.values()) == n_bytes, (summary.utf8_bytes, n_bytes)
        best[f'pipeline workers={w}'] = min(best[f'pipeline workers={w}'], summary.seconds)
      for name in ('encode_batch', 'encode_batch_fast'):
        with timing.Timer() as t:
          getattr(plain, name)(texts)
        best[name] = min(best[name], t.seconds)
    mbs = {k: n_bytes / v / 1e6 for k, v in best.items()}

  print(f'\nshard stage on {len(texts):,} documents, {n_bytes / 1e6:.1f} MB UTF-8, '
        f'{os.cpu_count()} cores, best of {args.repeats}:')
  for k, v in mbs.items():
    print(f'  {k:22} {best[k]:6.2f} s  {v:6.2f} MB/s')
  for w in modes:
    print(f'  ratio pipeline workers={w} / encode_batch = '
          f'{mbs[f"pipeline workers={w}"] / mbs["encode_batch"]:.2f}')

  print(f'\ntokenizer training peak memory (vocab {args.vocab}, child process VmHWM):')
  for n in (int(x) for x in args.train_chars.split(',')):
    m = _train_memory(n, args.vocab)
    print(f'  max_train_chars={n:>11,}: peak {m["peak_mb"]:7.0f} MB (before training '
          f'{m["before_mb"]:.0f} MB), {m["seconds"]:.1f} s')


if __name__ == '__main__':
  main()
