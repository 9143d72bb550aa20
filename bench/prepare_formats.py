"""Format mode of bench/prepare.py: the same corpus as jsonl, jsonl.zst and parquet, side by side.

  python bench/prepare.py --formats 1 [--repeats 2] [--scale_dir /tmp/zhgpt_formats]

The corpus: prepare_scale's synthetic one-source corpus of GB gigabytes (4-30 People's Daily
sentences recombined a document, 5% exact and 5% near copies), as jsonl files of <= 256 MB,
then the same files as .jsonl.zst (zstandard level 3, one frame a file, as the zstd tool
writes) and as .parquet (pyarrow, zstd-compressed columns, 10,000-row groups as the hub's
parquet converter writes them). A tokenizer is trained once (8,000 tokens on the first
5M characters) and given to every run, so each run is the read + scan + shard pass only.

Each run is `prepare` (dedup='exact', the default; every core) in a child process whose whole process tree's RSS and PSS are polled every 0.1 s (PSS shares a library's pages
out among the processes that map them; RSS counts them in each). Formats are
interleaved (jsonl, zst, parquet, then again), so the machine's changing load hits them
alike; the 1-minute load average is recorded around each run. Reported per format: MB of
document text (UTF-8) per second (best of the repeats) and each round's ratio to that
round's jsonl run, MB per CPU-second of the process tree (user + system: what a busy
machine's load stretches far less than wall time), peak RSS of the process tree, and the
ratios to jsonl; the shards of every format must be byte-identical to jsonl's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import prepare_scale  # pylint: disable=import-error  (bench/ is on sys.path)
import timing  # pylint: disable=import-error  (bench/ is on sys.path)

from zhgpt_jax import dataprep  # pylint: disable=wrong-import-position  (prepare_scale puts the repo on sys.path)

SOURCES = (('news', 1.0),)
FORMATS = ('jsonl', 'jsonl.zst', 'parquet')


def _convert(directory: str) -> dict[str, str]:
  """The corpus in each format: {format: directory}; written once."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  import zstandard  # pylint: disable=import-outside-toplevel
  src = os.path.join(directory, 'news')
  out = {'jsonl': src}
  for fmt in FORMATS[1:]:
    dst = os.path.join(directory, fmt.replace('.', '_'))
    out[fmt] = dst
    if os.path.exists(os.path.join(dst, 'DONE')):
      continue
    os.makedirs(dst, exist_ok=True)
    clock = timing.Timer().start()
    for name in sorted(os.listdir(src)):
      path = os.path.join(src, name)
      if fmt == 'jsonl.zst':
        with open(path, 'rb') as f, open(os.path.join(dst, name + '.zst'), 'wb') as g:
          zstandard.ZstdCompressor(level=3).copy_stream(f, g)
        continue
      writer = None
      with open(path, encoding='utf-8') as f:
        while True:
          rows = [json.loads(line) for _, line in zip(range(10_000), f)]
          if not rows:
            break
          table = pa.Table.from_pylist(rows)
          if writer is None:
            writer = pq.ParquetWriter(os.path.join(dst, name[:-len('.jsonl')] + '.parquet'),
                                      table.schema, compression='zstd')
          writer.write_table(table)
      writer.close()
    open(os.path.join(dst, 'DONE'), 'w').close()
    print(f'wrote {fmt} in {clock.elapsed():.0f} s', flush=True)
  return out


def _tree_memory(pid: int) -> tuple[int, int]:
  """(RSS, PSS) in bytes of `pid` and its descendants. RSS counts a shared library's pages
  once per process (pyarrow's ~35 MB in every worker); PSS shares them out."""
  rss = pss = 0
  stack = [pid]
  while stack:
    p = stack.pop()
    try:
      with open(f'/proc/{p}/smaps_rollup', encoding='ascii') as f:
        for line in f:
          if line.startswith(('Rss:', 'Pss:')):
            value = int(line.split()[1]) * 1024
            rss, pss = (rss + value, pss) if line.startswith('Rss:') else (rss, pss + value)
      for tid in os.listdir(f'/proc/{p}/task'):
        with open(f'/proc/{p}/task/{tid}/children', encoding='ascii') as f:
          stack.extend(int(c) for c in f.read().split())
    except OSError:
      pass
  return rss, pss


def _run(args: dict) -> dict:
  """prepare_scale's 'prepare' child, its tree's peak RSS and PSS polled."""
  cmd = [sys.executable, prepare_scale.__file__, 'prepare', json.dumps(args)]
  cpu0 = timing.children_cpu_seconds()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
  peak_rss = peak_pss = 0
  while proc.poll() is None:
    rss, pss = _tree_memory(proc.pid)
    peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
    time.sleep(0.1)
  out = proc.stdout.read()
  if proc.returncode:
    raise RuntimeError(f'prepare failed ({proc.returncode}): {out[-2000:]}')
  return dict(json.loads(out.strip().splitlines()[-1]), peak_rss_mb=peak_rss / 2**20,
              peak_pss_mb=peak_pss / 2**20, cpu_s=timing.children_cpu_seconds() - cpu0)


def _size(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
             if f != 'DONE')


def _tokenizer(directory: str, jsonl_dir: str) -> str:
  tok_dir = os.path.join(directory, 'tokenizer')
  if os.path.exists(os.path.join(tok_dir, 'tokenizer.json')):
    return tok_dir
  from zhgpt_jax import corpus, documents, tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  from zhgpt_jax.config import default_config  # pylint: disable=import-outside-toplevel
  data = default_config('tiny').data
  data.corpus = jsonl_dir
  docs, chars = [], 0
  for doc in documents.iter_documents(data, 'train', corpus.CorpusStats()):
    docs.append(doc)
    chars += len(doc)
    if chars > 5_000_000:
      break
  tokenizer_lib.save_tokenizer(tokenizer_lib.train_tokenizer(docs, 8000), tok_dir)
  return tok_dir


def main(gb: float, repeats: int, scale_dir: str) -> None:
  directory = os.path.join(scale_dir, f'formats-{gb:g}GB')
  prepare_scale.synthesize(directory, gb, SOURCES)
  dirs = _convert(directory)
  tok = _tokenizer(directory, dirs['jsonl'])
  runs = {fmt: [] for fmt in FORMATS}
  digests = {}
  for r in range(repeats):
    for fmt in FORMATS:   # interleaved: load from elsewhere hits every format alike
      work = os.path.join(directory, 'runs', f'{fmt}-{r}')
      load0 = os.getloadavg()[0]
      out = _run(dict(corpus=dirs[fmt], tokenizer=tok, work=work, vocab=8000))
      out.update(load_before=load0, load_after=os.getloadavg()[0])
      digests.setdefault(fmt, dataprep.digest(os.path.join(work, 'data')))
      os.system(f'rm -rf {work}')   # pylint: disable=consider-using-subprocess  (our own run dir)
      runs[fmt].append(out)
      print(f'{fmt:10} run {r}: {out["utf8_bytes"] / out["seconds"] / 1e6:6.2f} MB/s, '
            f'{out["utf8_bytes"] / out["cpu_s"] / 1e6:5.2f} MB per CPU-s, peak RSS '
            f'{out["peak_rss_mb"]:,.0f} MB (PSS {out["peak_pss_mb"]:,.0f}), '
            f'load {load0:.1f} -> {out["load_after"]:.1f}', flush=True)
  assert len(set(digests.values())) == 1, f'shards differ between formats: {digests}'
  text = runs['jsonl'][0]['utf8_bytes']
  best = {f: max(o['utf8_bytes'] / o['seconds'] / 1e6 for o in runs[f]) for f in FORMATS}
  peak = {f: max(o['peak_rss_mb'] for o in runs[f]) for f in FORMATS}
  pss = {f: max(o['peak_pss_mb'] for o in runs[f]) for f in FORMATS}
  per_cpu = {f: max(o['utf8_bytes'] / o['cpu_s'] / 1e6 for o in runs[f]) for f in FORMATS}
  # Each round's own ratio to that round's jsonl run (the runs next to each other in time).
  rounds = {f: [runs['jsonl'][r]['seconds'] / o['seconds']
                for r, o in enumerate(runs[f])] for f in FORMATS}
  print(f'\n{gb:g} GB corpus ({text / 1e6:,.0f} MB of document text, '
        f'{runs["jsonl"][0]["documents"]:,} documents kept), {os.cpu_count()} cores, '
        f'best of {repeats}, shards byte-identical across formats:')
  print('| format | on disk | MB/s of text | × jsonl | × jsonl each round | MB per CPU-s | × jsonl '
        '| peak RSS (tree) | × jsonl | peak PSS (tree) | × jsonl | load (1 min) |')
  print('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')
  for f in FORMATS:
    loads = [o['load_before'] for o in runs[f]] + [o['load_after'] for o in runs[f]]
    print(f'| {f} | {_size(dirs[f]) / 1e6:,.0f} MB | {best[f]:.2f} | '
          f'{best[f] / best["jsonl"]:.2f} | {", ".join(f"{x:.2f}" for x in rounds[f])} | '
          f'{per_cpu[f]:.2f} | {per_cpu[f] / per_cpu["jsonl"]:.2f} | '
          f'{peak[f]:,.0f} MB | {peak[f] / peak["jsonl"]:.2f} | '
          f'{pss[f]:,.0f} MB | {pss[f] / pss["jsonl"]:.2f} | {min(loads):.0f}–{max(loads):.0f} |')
  with open(os.path.join(directory, 'results.json'), 'w', encoding='utf-8') as fh:
    json.dump(dict(runs=runs, best_mb_s=best, peak_rss_mb=peak, peak_pss_mb=pss,
                   mb_per_cpu_s=per_cpu, round_ratios=rounds), fh, indent=1)
