"""Multi-host training through `python main.py`: 2 processes on localhost (gloo CPU collectives),
2 simulated devices each, against 1 process with 4 devices on the same global batches.

One scenario, checked in three tests. A 1 × 4 reference trains while a 2 × 2 run does; once
the 2 × 2 run has saved step 3 and logged step 4, process 1 is killed (SIGKILL), and process 0
must stop with a clear message within config.dist.timeout_s. Both processes are started again
with the same command: they resume from the checkpoint (the state, and each process's data
position), evaluate at step 8, and are then sent SIGTERM a moment apart, as a scheduler
would: both must stop at one step, save it and exit 0. Every train loss logged on the way must
equal the reference's.

The reference stops (SIGTERM) once it has the steps the 2 × 2 run will log, rather than take a
core of a 2-core machine through the whole scenario; if the 2 × 2 run went further, it resumes.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import devices_env, free_port
from zhgpt_jax import corpus, documents, metrics
from zhgpt_jax.config import default_config

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # processes training together

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_STEP = 8         # the resumed run evaluates here; SIGTERM follows
REF_STEPS = EVAL_STEP + 4   # the reference stops here: the 2 x 2 run stops at ~EVAL_STEP
CKPT_EVERY = 3
TIMEOUT_S = 10        # config.dist.timeout_s of the 2-process runs
LAUNCH_S = 240        # a generous bound for one phase on a loaded 2-core machine


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """A 400-document corpus file; the data cache and XLA compile cache all runs share go here."""
  d = tmp_path_factory.mktemp('multihost')
  docs = documents.iter_documents(default_config().data, 'all', corpus.CorpusStats())
  (d / 'pd.txt').write_text('\n'.join(next(docs) for _ in range(400)), encoding='utf-8')
  return d


def cli_args(shared, workdir: str, **overrides) -> list[str]:
  # No run here reaches train.steps: the test stops each one. min_lr_ratio=1 holds the rate
  # constant after warmup, so the reference and every 2-process launch share one trajectory.
  flat = {
      'data.corpus': shared / 'pd.txt', 'data.cache_dir': shared / 'data',
      'data.val_fraction': 0.1, 'data.tokenize_workers': 1, 'tokenizer.vocab_size': 512,
      'tokenizer.max_train_chars': 1_000_000, 'model.n_layer': 1, 'model.n_head': 4,
      'model.d_model': 64, 'model.seq_len': 32, 'optim.lr': 3e-3, 'optim.warmup_steps': 2,
      'optim.min_lr_ratio': 1.0, 'train.steps': 1000, 'train.per_device_batch': 2,
      'train.log_every': 1, 'train.eval_every': 1000, 'train.ckpt_every': CKPT_EVERY,
      'train.eval_max_batches': 1, 'train.eval_batch': 2, 'train.peak_flops': 1e11,
      'train.sample_tokens': 4, 'dist.timeout_s': TIMEOUT_S, **overrides}
  return ['--config', os.path.join(ROOT, 'configs', 'tiny.py') + ':gpt2', '--workdir', workdir] + [
      f'--config.{k}={v}' for k, v in flat.items()]


def launch(shared, args: list[str], devices: int, log: str) -> subprocess.Popen:
  env = devices_env(devices, JAX_COMPILATION_CACHE_DIR=str(shared / 'xla_cache'),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  with open(log, 'w') as f:
    return subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *args], env=env,
                            stdout=f, stderr=subprocess.STDOUT)


def launch_pair(shared, workdir: str, tag: str, **overrides) -> list[subprocess.Popen]:
  dist = [f'--config.dist.coordinator=127.0.0.1:{free_port()}', '--config.dist.num_processes=2']
  return [launch(shared, cli_args(shared, workdir, **overrides) + dist +
                 [f'--config.dist.process_id={i}'], 2, f'{workdir}-{tag}{i}.log')
          for i in range(2)]


def output(log: str) -> str:
  with open(log, encoding='utf-8', errors='replace') as f:
    return f.read()


def finish(procs, timeout=LAUNCH_S) -> list[int]:
  """Exit codes; a process still running after `timeout` is killed (and reads as None)."""
  end = time.time() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(0.1, end - time.time())))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()
      codes.append(None)
  return codes


def wait_for(condition, procs, log: str) -> None:
  end = time.time() + LAUNCH_S
  while not condition():
    assert time.time() < end and all(p.poll() is None for p in procs), output(log)[-3000:]
    time.sleep(0.02)


def records(workdir: str, split: str) -> list[dict]:
  return [r for r in metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if r['split'] == split]


def stop_at(proc: subprocess.Popen, workdir: str, steps: int) -> None:
  """Sends `proc` SIGTERM (it saves and exits) once it has logged `steps` train steps."""
  def watch():
    while proc.poll() is None:
      try:
        if len(records(workdir, 'train')) >= steps:
          proc.send_signal(signal.SIGTERM)
          return
      except ValueError:   # a line being written
        pass
      time.sleep(0.05)
  threading.Thread(target=watch, daemon=True).start()


def committed_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def data_files(workdir: str, step: int) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints', str(step), 'data')))


@pytest.fixture(scope='module')
def runs(shared, tmp_path_factory):
  """Runs the scenario once; returns what the tests check."""
  root = tmp_path_factory.mktemp('runs')
  ref_dir, mh_dir = str(root / 'ref'), str(root / 'mh')
  t0 = time.time()
  # Both process 0s prepare the shared data cache; its lock lets one build and the other reuse.
  ref = launch(shared, cli_args(shared, ref_dir), 4, f'{ref_dir}.log')
  stop_at(ref, ref_dir, REF_STEPS)
  first = launch_pair(shared, mh_dir, 'killed')
  out = {}
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(finish, [ref, *first], 0)
    wait_for(lambda: (len(records(mh_dir, 'train')) > CKPT_EVERY
                      and CKPT_EVERY in committed_steps(mh_dir)), first, f'{mh_dir}-killed0.log')
    first[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    rc = finish(first[:1], TIMEOUT_S + 60)[0]
    out['lost'] = dict(rc=rc, seconds=time.time() - killed_at,
                       log=output(f'{mh_dir}-killed0.log'))
    out['first_data_files'] = data_files(mh_dir, CKPT_EVERY)

    out['before_resume'] = len(records(mh_dir, 'train'))
    second = launch_pair(shared, mh_dir, 'resumed', **{'train.eval_every': EVAL_STEP})
    cleanup.callback(finish, second, 0)
    wait_for(lambda: records(mh_dir, 'val'), second, f'{mh_dir}-resumed0.log')
    second[1].send_signal(signal.SIGTERM)
    time.sleep(0.3)
    second[0].send_signal(signal.SIGTERM)
    out['term_rcs'] = finish(second, 120)
    out['resumed'] = [output(f'{mh_dir}-resumed{i}.log') for i in range(2)]
    last = max(r['step'] for r in records(mh_dir, 'train'))
    out['ref_rc'] = finish([ref])[0]
    if len(records(ref_dir, 'train')) < last:   # the 2 x 2 run went past REF_STEPS
      ref = launch(shared, cli_args(shared, ref_dir), 4, f'{ref_dir}-more.log')
      cleanup.callback(finish, [ref], 0)
      wait_for(lambda: len(records(ref_dir, 'train')) >= last, [ref], f'{ref_dir}-more.log')
  print(f'\nmultihost scenario: {time.time() - t0:.0f}s; process 0 stopped '
        f'{out["lost"]["seconds"]:.1f}s after process 1 was killed')
  return dict(out, ref_dir=ref_dir, mh_dir=mh_dir)


def test_a_killed_process_is_reported_by_the_other(runs):
  """Process 0 stops within timeout_s with a clear message, by whichever route it learns.

  Waiting on a peer inside a collective whose sockets break, it gets an error at once and
  main.py prints one line; waiting where no socket breaks, jax's coordination service misses
  process 1's heartbeats for dist.timeout_s and jax aborts the process with its own line.
  """
  lost = runs['lost']
  log = lost['log']
  assert lost['rc'] not in (0, None), log[-3000:]
  assert lost['seconds'] < TIMEOUT_S + 30, log[-3000:]
  ours = [line for line in log.splitlines() if line.startswith('main.py: error:')]
  jax_abort = 'Terminating process because the JAX distributed service detected fatal errors'
  if ours:
    assert len(ours) == 1 and lost['rc'] == 1, log[-3000:]
    assert 'process 0 of 2: another process of this run died or stopped answering' in ours[0]
  else:
    assert jax_abort in log and 'stopped sending heartbeats' in log, log[-3000:]
  print('\nprocess 0 reported:', ours[0] if ours else jax_abort)


def test_sigterm_stops_every_process_at_one_step_and_saves_it(runs):
  out0, out1 = runs['resumed']
  assert runs['term_rcs'] == [0, 0], (out0[-3000:], out1[-3000:])
  saved = int(out0.split('SIGTERM: saved step ')[1].split()[0])
  assert saved >= EVAL_STEP and saved in committed_steps(runs['mh_dir'])
  # Each process saved its own data-iterator position; orbax wrote the rest once.
  for files in (runs['first_data_files'], data_files(runs['mh_dir'], saved)):
    assert files == ['commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']


def test_two_processes_resume_and_match_one_process_with_four_devices(runs):
  assert runs['ref_rc'] == 0
  ref = {r['step']: r['loss'] for r in records(runs['ref_dir'], 'train')}
  mh = records(runs['mh_dir'], 'train')
  out0, out1 = runs['resumed']
  resumed_from = int(out0.split('resuming from step ')[1].split()[0])
  assert CKPT_EVERY <= resumed_from < EVAL_STEP
  # Only process 0 logs and prints, and the resumed run first dropped the records past its
  # step: one record per step in all.
  resumed = [r['step'] for r in mh]
  assert resumed == list(range(1, resumed[-1] + 1)) and resumed[-1] >= EVAL_STEP
  assert runs['before_resume'] > resumed_from    # steps past the checkpoint were redone
  assert [r['step'] for r in records(runs['mh_dir'], 'val')] == [EVAL_STEP]
  assert 'resuming' not in out1 and 'val loss' not in out1 and 'SIGTERM: saved' not in out1
  mh_loss = {r['step']: r['loss'] for r in mh}   # the last record of a step wins
  assert sorted(mh_loss) == list(range(1, resumed[-1] + 1))
  for step, loss in mh_loss.items():
    assert loss == pytest.approx(ref[step], rel=1e-5), step
