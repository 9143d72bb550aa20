"""Scale mode of bench/prepare.py: `prepare` on synthetic multi-source corpora of many GB.

  python bench/prepare.py --scale 0.25,1,3 [--kill_trials 5] [--scale_dir /tmp/zhgpt_scale]

Each corpus: three sources of different sizes and styles, as jsonl files of <= 256 MB —
news (50%: 4-30 People's Daily sentences recombined), web (30%: 3-15 product reviews and a
link), books (20%: 3-8 quoted paragraphs of news sentences) — where 5% of the documents are
exact copies of an earlier one and 5% near copies (1 character in 100 replaced: Jaccard of
5-grams ~0.9, measured on a sample). The truth is kept per document (labels.npy).

For each size, one after the other, each in a child process whose whole process tree's RSS
is polled every 0.1 s:
  1. scan, dedup='near', with the tokenizer sample: time, peak RSS, dedup quality against
     the truth, each source's share of the sample against its share of the corpus;
  2. scan, dedup='none': the same pass without dedup, so (1) - (2) is what dedup costs;
  3. raw `Tokenizer.encode_batch` (Rust threads on all cores) on ~48 MB of the corpus's
     documents held in memory: the side-by-side baseline for (4);
  4. `prepare` with dedup='exact' (the default) and a given tokenizer (so tokenizer
     training, bounded by max_train_chars, is not in the peak): wall time, MB/s, peak RSS.
Then: `kill_trials` trials of `prepare` (dedup='near') on a 2-source 24 MB corpus: killed with SIGKILL at a
random moment of the scan (after its first checkpoint), run again and killed at a random
moment of the shard pass, run a third time; shards' sha256 against an uninterrupted run's;
and the loader mixing those 2 sources 2:1 over 1,000 batches, with a mid-epoch resume. Results go to <scale_dir>/results.json as they come.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from zhgpt_jax import builtin_corpus, corpus, dataprep, documents  # pylint: disable=wrong-import-position
import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)

SOURCES = (('news', 0.5), ('web', 0.3), ('books', 0.2))
EXACT, NEAR = 0.05, 0.05
FILE_BYTES = 256 << 20


# ----------------------------------------------------------------------------- synthesis

def _pools():
  with open(builtin_corpus.paths()['news'], encoding='utf-8') as f:
    lines = [builtin_corpus.strip_pos_tags(l) for l in f]
  news = [s for l in lines for s in l.split('。') if len(s) >= 6]
  return news, [t for t, _ in builtin_corpus.reviews()]


def _document(kind: str, rng: random.Random, news, reviews, serial: int) -> str:
  if kind == 'news':
    return '。'.join(rng.choice(news) for _ in range(rng.randint(4, 30))) + '。'
  if kind == 'web':
    return (' '.join(rng.choice(reviews) for _ in range(rng.randint(3, 15))) +
            f' 详情见 https://shop.example.com/item/{serial}')
  return '\n'.join('“' + '。'.join(rng.choice(news) for _ in range(rng.randint(2, 6))) + '。”'
                   for _ in range(rng.randint(3, 8)))


def _near_copy(text: str, rng: random.Random) -> str:
  chars = list(text)
  for k in rng.sample(range(len(chars)), max(1, len(chars) // 100)):
    new = chr(0x4E00 + rng.randrange(20000))
    chars[k] = new if new != chars[k] else '〇'
  return ''.join(chars)


def synthesize(directory: str, gb: float, sources=SOURCES, seed: int = 0) -> None:
  """Writes the corpus (see the module docstring) unless it is there already."""
  if os.path.exists(os.path.join(directory, 'labels.npy')):
    return
  clock = timing.Timer().start()
  rng = random.Random(seed)
  news, reviews = _pools()
  recent, labels, serial = [], [], 0
  total = sum(share for _, share in sources)
  for name, share in sources:
    os.makedirs(os.path.join(directory, name), exist_ok=True)
    budget, written, part, f = gb * 1e9 * share / total, 0, 0, None
    while written < budget:
      if f is None or f.tell() >= FILE_BYTES:
        if f:
          f.close()
        f = open(os.path.join(directory, name, f'part-{part:04d}.jsonl'), 'wb')
        part += 1
      r = rng.random()
      if recent and r < EXACT:
        text, label = rng.choice(recent), 1
      elif recent and r < EXACT + NEAR:
        text, label = _near_copy(rng.choice(recent), rng), 2
      else:
        serial += 1
        text, label = _document(name, rng, news, reviews, serial), 0
        if len(recent) < 50_000:
          recent.append(text)
        else:
          recent[rng.randrange(len(recent))] = text
      line = (json.dumps({'text': text}, ensure_ascii=False) + '\n').encode('utf-8')
      f.write(line)
      written += len(line)
      labels.append(label)
    f.close()
  np.save(os.path.join(directory, 'labels.npy'), np.array(labels, np.uint8))
  print(f'synthesized {gb} GB in {directory} ({len(labels):,} documents) in '
        f'{clock.elapsed():.0f} s', flush=True)


def spec(directory: str, sources=SOURCES) -> str:
  return ','.join(os.path.join(directory, name) for name, _ in sources)


# ----------------------------------------------------------------------------- children

def _config(args: dict):
  from zhgpt_jax.config import default_config  # pylint: disable=import-outside-toplevel
  c = default_config('tiny')
  c.data.corpus = args['corpus']
  c.data.dedup = args.get('dedup', 'exact')
  c.data.cache_dir = args.get('cache_dir', '')
  c.data.shard_tokens = args.get('shard_tokens', c.data.shard_tokens)
  c.tokenizer.vocab_size = args.get('vocab', 8000)
  c.tokenizer.path = args.get('tokenizer', '')
  return c


def _child(kind: str, args: dict) -> dict:
  from zhgpt_jax import scan, tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  config = _config(args) if 'corpus' in args else None
  if kind == 'scan':
    with timing.Timer() as t:
      found = scan.scan(config, frozenset(), args['sample'], False, args['work'])
    out = dict(seconds=t.seconds)
    np.save(args['removed'], found.removed)
    if args['sample']:
      keep = (found.removed == 0) & ~found.val
      corpus_chars = np.bincount(found.source[keep], found.chars[keep].astype(np.float64), 3)
      sample_chars = np.bincount(np.array(found.sample_sources), [len(t) for t in found.sample], 3)
      out.update(corpus_share=(corpus_chars / corpus_chars.sum()).tolist(),
                 sample_share=(sample_chars / sample_chars.sum()).tolist(),
                 sample_chars=int(sample_chars.sum()), corpus_chars=int(corpus_chars.sum()))
    return out
  if kind == 'prepare':
    with timing.Timer() as t:
      s = dataprep.prepare(config, args['work'], progress=False)
    return dict(seconds=t.seconds, utf8_bytes=sum(s.utf8_bytes.values()),
                tokens=sum(s.tokens.values()), documents=sum(s.documents.values()))
  if kind == 'raw':
    docs, n = [], 0
    for name, share in SOURCES:  # the first documents of each source, in its share
      with open(os.path.join(args['dir'], name, 'part-0000.jsonl'), encoding='utf-8') as f:
        got = 0
        for line in f:
          text = json.loads(line)['text']
          docs.append(text)
          got += len(text.encode('utf-8'))
          if got >= args['bytes'] * share:
            break
        n += got
    tok = tokenizer_lib.as_plain_text(tokenizer_lib.load_tokenizer(args['tokenizer']))
    with timing.Timer() as t:
      tok.encode_batch(docs)
    return dict(seconds=t.seconds, utf8_bytes=n)
  if kind == 'train_tokenizer':
    data = _config(args).data
    docs = documents.iter_documents(data, 'train', corpus.CorpusStats())
    tok = tokenizer_lib.train_tokenizer(docs, args['vocab'], max_train_chars=20_000_000)
    tokenizer_lib.save_tokenizer(tok, args['out'])
    return {}
  raise ValueError(kind)


def _tree_rss(pid: int) -> int:
  """RSS in bytes of `pid` and all its descendants."""
  total, stack = 0, [pid]
  while stack:
    p = stack.pop()
    try:
      with open(f'/proc/{p}/status', encoding='ascii') as f:
        total += next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) * 1024
      for tid in os.listdir(f'/proc/{p}/task'):
        with open(f'/proc/{p}/task/{tid}/children', encoding='ascii') as f:
          stack.extend(int(c) for c in f.read().split())
    except (OSError, StopIteration):
      pass
  return total


def run_child(kind: str, args: dict, kill_when=None) -> dict:
  """Runs _child(kind, args) in a new process group at nice 10; returns its JSON result with
  peak_rss_mb (of the whole tree) and wall seconds. `kill_when(proc)` -> True kills it."""
  cmd = [sys.executable, os.path.abspath(__file__), kind, json.dumps(args)]
  clock = timing.Timer().start()
  proc = subprocess.Popen(['nice', '-n', '10', *cmd], stdout=subprocess.PIPE, text=True,
                          start_new_session=True)
  peak, series, last = 0, [], -5.0
  while proc.poll() is None:
    rss = _tree_rss(proc.pid)
    peak = max(peak, rss)
    if clock.elapsed() - last >= 5:   # where the peak falls: the scan or the shards
      last = clock.elapsed()
      series.append((round(last), round(rss / 2**20)))
    if kill_when and kill_when(proc):
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      return dict(killed=True, wall=clock.elapsed(), peak_rss_mb=peak / 2**20,
                  rss_mb_every_5s=series, stdout=proc.stdout.read())
    time.sleep(0.1)
  out = proc.stdout.read()
  if proc.returncode:
    raise RuntimeError(f'{kind} failed ({proc.returncode}): {out[-2000:]}')
  result = json.loads(out.strip().splitlines()[-1])
  result.update(peak_rss_mb=peak / 2**20, wall=clock.elapsed(), stdout=out,
                rss_mb_every_5s=series)
  return result


# ----------------------------------------------------------------------------- measurements

def _quality(removed_path: str, labels_path: str) -> dict:
  removed, labels = np.load(removed_path), np.load(labels_path)
  assert len(removed) == len(labels), (len(removed), len(labels))
  rate = lambda l: float((removed[labels == l] != 0).mean())   # pylint: disable=unnecessary-lambda-assignment
  return dict(exact_removed=rate(1), near_removed=rate(2), unique_removed=rate(0),
              exact=int((labels == 1).sum()), near=int((labels == 2).sum()),
              unique=int((labels == 0).sum()))


def _near_jaccard(directory: str, n: int = 500) -> list[float]:
  """Jaccard of 5-gram sets between near copies and their originals, re-made with the
  synthesis' own edit on a fresh sample."""
  rng = random.Random(1)
  news, reviews = _pools()
  out = []
  for i in range(n):
    kind = SOURCES[i % 3][0]
    a = _document(kind, rng, news, reviews, i)
    b = _near_copy(a, rng)
    sa, sb = ({t[j:j + 5] for j in range(len(t) - 4)} for t in (a, b))
    out.append(len(sa & sb) / len(sa | sb))
  return out


RESULTS = 'results.json'


def _save(results: dict, scale_dir: str) -> None:
  with open(os.path.join(scale_dir, RESULTS), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=1)


def measure_size(gb: float, scale_dir: str, tokenizer: str, results: dict,
                 phases=('scan', 'prepare')) -> None:
  d = os.path.join(scale_dir, f'{gb:g}GB')
  synthesize(d, gb)
  corpus_spec = spec(d)
  mb = sum(os.path.getsize(os.path.join(d, n, f)) for n, _ in SOURCES
           for f in os.listdir(os.path.join(d, n))) / 1e6
  r = results.setdefault(f'{gb:g}GB', dict(input_mb=mb))
  removed = os.path.join(scale_dir, 'removed.npy')
  if 'scan' in phases:
    _scans(d, corpus_spec, scale_dir, removed, r, results)
  if 'prepare' in phases:
    _prepare(d, mb, corpus_spec, scale_dir, tokenizer, r, results)
  print(f'{gb:g} GB: {json.dumps(r)}', flush=True)


def _scans(d, corpus_spec, scale_dir, removed, r, results):
  near = run_child('scan', dict(corpus=corpus_spec, dedup='near', sample=True,
                                work=os.path.join(scale_dir, 'scratch'), removed=removed))
  r['scan_near'] = dict(seconds=near['seconds'], peak_rss_mb=near['peak_rss_mb'],
                        **_quality(removed, os.path.join(d, 'labels.npy')),
                        corpus_share=near['corpus_share'], sample_share=near['sample_share'],
                        sample_chars=near['sample_chars'], corpus_chars=near['corpus_chars'])
  _save(results, scale_dir)
  plain = run_child('scan', dict(corpus=corpus_spec, dedup='none', sample=False,
                                 work=os.path.join(scale_dir, 'scratch'), removed=removed))
  r['scan_none'] = dict(seconds=plain['seconds'], peak_rss_mb=plain['peak_rss_mb'])
  _save(results, scale_dir)


def _prepare(d, mb, corpus_spec, scale_dir, tokenizer, r, results):
  raw = run_child('raw', dict(dir=d, bytes=48e6, tokenizer=tokenizer))
  r['raw_encode_batch_mb_s'] = raw['utf8_bytes'] / raw['seconds'] / 1e6
  cache = os.path.join(scale_dir, 'prepared')
  subprocess.run(['rm', '-rf', cache], check=True)
  prep = run_child('prepare', dict(corpus=corpus_spec, tokenizer=tokenizer, cache_dir=cache,
                                   work=os.path.join(scale_dir, 'work')))
  r['prepare'] = dict(seconds=prep['seconds'], wall=prep['wall'], peak_rss_mb=prep['peak_rss_mb'],
                      rss_mb_every_5s=prep['rss_mb_every_5s'],
                      scan_line=next((l for l in prep['stdout'].splitlines()
                                      if l.startswith('scan:')), ''),
                      tokenized_utf8_mb=prep['utf8_bytes'] / 1e6, tokens=prep['tokens'],
                      input_mb_s=mb / prep['seconds'],
                      tokenized_mb_s=prep['utf8_bytes'] / prep['seconds'] / 1e6)
  r['prepare']['ratio_tokenized_vs_raw'] = r['prepare']['tokenized_mb_s'] / r['raw_encode_batch_mb_s']
  _save(results, scale_dir)
  subprocess.run(['rm', '-rf', cache], check=True)


def kill_trials(n: int, scale_dir: str, tokenizer: str, results: dict) -> None:
  d = os.path.join(scale_dir, 'kill')
  two = SOURCES[:2]
  synthesize(d, 0.024, sources=two, seed=5)
  base = dict(corpus=spec(d, two), tokenizer=tokenizer, shard_tokens=500_000, dedup='near',
              work=os.path.join(scale_dir, 'work'))   # near: the scan's every scratch file
  whole = os.path.join(scale_dir, 'kill_whole')
  subprocess.run(['rm', '-rf', whole], check=True)
  first = run_child('prepare', dict(base, cache_dir=whole))
  want = dataprep.digest(whole)
  scan_s = float(next(l for l in first['stdout'].splitlines() if l.startswith('scan:'))
                 .split(' in ')[1].split()[0])
  trials = []
  rng = random.Random(0)
  for t in range(n):
    cache = os.path.join(scale_dir, f'kill_{t}')
    subprocess.run(['rm', '-rf', cache], check=True)
    # 1st run killed in the scan (a random 0-60% of its time after its first checkpoint),
    # 2nd run killed in the shard pass (0-60% of the whole run after its first shard), the
    # 3rd run finishes.
    lines = []
    killed = []
    for progress, span in ((os.path.join(cache, '.scan-build', 'progress.json'), scan_s),
                           (os.path.join(cache, '.build', 'progress.json'), first['seconds'])):
      state = {'seen': None, 'delay': rng.uniform(0.0, 0.6) * span}

      def kill_when(_, progress=progress, state=state):
        if state['seen'] is None and os.path.exists(progress):
          state['seen'] = timing.Timer().start()
        return state['seen'] is not None and state['seen'].elapsed() >= state['delay']

      run = run_child('prepare', dict(base, cache_dir=cache), kill_when)
      killed.append(round(run['wall'], 1) if run.get('killed') else None)
      lines.extend(l for l in run.get('stdout', '').splitlines() if 'resuming' in l)
    again = run_child('prepare', dict(base, cache_dir=cache))
    lines.extend(l for l in again['stdout'].splitlines() if 'resuming' in l)
    trials.append(dict(killed_after_s=killed, resume=lines,
                       identical=dataprep.digest(cache) == want))
    subprocess.run(['rm', '-rf', cache], check=True)
  results['kill'] = dict(uninterrupted_s=first['seconds'], sha256=want, trials=trials)
  _save(results, scale_dir)
  print(json.dumps(results['kill'], ensure_ascii=False, indent=1), flush=True)
  results['mixing'] = _mixing(whole)
  _save(results, scale_dir)
  print(json.dumps(results['mixing']), flush=True)


def _mixing(data_root: str, seq: int = 128) -> dict:
  """Loader with weights 2:1 on the 2 sources: each window's source found by its bytes."""
  from zhgpt_jax import data  # pylint: disable=import-outside-toplevel
  train = os.path.join(data_root, 'train')
  owner = {}
  for i in (0, 1):
    src = data.TokenWindows(train, seq, i)
    for j in range(len(src)):
      owner.setdefault(src[j].tobytes(), set()).add(i)
  args = dict(per_device_batch=16, grad_accum=1, local_devices=1, seed=0, process_index=0,
              process_count=1, weights=[2 / 3, 1 / 3])
  it = iter(data.train_loader(train, seq, **args))
  counts, unknown = np.zeros(2), 0
  resume_same = None
  for step in range(1000):
    batch = next(it)
    windows = np.concatenate([batch['inputs'], batch['targets'][..., -1:]], -1).reshape(-1, seq + 1)
    for w in windows:
      got = owner.get(w.astype(np.int32).tobytes(), set())
      if len(got) == 1:
        counts[next(iter(got))] += 1
      else:
        unknown += 1
    if step == 500:
      state = it.get_state()
      expected = [next(it)['inputs'].tobytes() for _ in range(5)]
      fresh = iter(data.train_loader(train, seq, **args))
      fresh.set_state(state)
      resume_same = [next(fresh)['inputs'].tobytes() for _ in range(5)] == expected
  return dict(windows=counts.tolist(), unattributed=unknown,
              share=(counts / counts.sum()).tolist(), asked=[2 / 3, 1 / 3],
              resume_same=resume_same)


def main(sizes, vocab: int, n_kill: int, scale_dir: str, phases=('scan', 'prepare'),
         results_name: str = 'results.json') -> None:
  global RESULTS
  RESULTS = results_name
  os.makedirs(scale_dir, exist_ok=True)
  results = {}
  tokenizer = os.path.join(scale_dir, f'tokenizer-{vocab}')
  if not os.path.exists(os.path.join(tokenizer, 'tokenizer.json')):
    run_child('train_tokenizer', dict(corpus='builtin', vocab=vocab, out=tokenizer))
  if n_kill:
    kill_trials(n_kill, scale_dir, tokenizer, results)
  for gb in sizes:
    measure_size(gb, scale_dir, tokenizer, results, phases)
  results['near_jaccard_sample'] = dict(
      zip(('min', 'median'), np.percentile(_near_jaccard(scale_dir), [0, 50]).tolist()))
  _save(results, scale_dir)
  print(json.dumps(results, indent=1), flush=True)


if __name__ == '__main__':
  result = _child(sys.argv[1], json.loads(sys.argv[2]))
  print(json.dumps(result), flush=True)
