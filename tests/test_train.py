"""The training loop end to end: learning, logs, checkpoints, exact resume, faults."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zhgpt_jax import corpus, documents, metrics, parallel, train
from zhgpt_jax import loss as loss_lib
from zhgpt_jax import model as M
from zhgpt_jax.config import UserError, default_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


@pytest.fixture(scope='module')
def small_corpus(tmp_path_factory):
  """800 People's Daily documents from the builtin corpus, as a .txt file."""
  d = tmp_path_factory.mktemp('corpus')
  data_cfg = default_config().data
  docs = documents.iter_documents(data_cfg, 'all', corpus.CorpusStats())
  lines = [next(docs) for _ in range(800)]
  path = d / 'pd.txt'
  path.write_text('\n'.join(lines), encoding='utf-8')
  return str(path), str(d / 'cache')


def tiny_config(small_corpus, **train_overrides):
  path, cache = small_corpus
  c = default_config('tiny')
  c.data.update(corpus=path, cache_dir=cache, val_fraction=0.1)
  c.tokenizer.update(vocab_size=512, max_train_chars=1_000_000)
  c.model.update(n_layer=2, n_head=4, d_model=64, seq_len=32, tie_embeddings=False)
  c.optim.update(name='muon', lr=3e-3, warmup_steps=3)    # configs/tiny.py's optimizer
  c.train.update(steps=STEPS, per_device_batch=4, log_every=1, eval_every=10, ckpt_every=5,
                 eval_max_batches=2, eval_batch=8, short_seq_len=16, short_seq_steps=4,
                 peak_flops=1e11, sample_tokens=8)
  c.train.update(train_overrides)
  return c


def train_losses(workdir):
  """step -> train loss, the last record winning (a resumed run may repeat steps)."""
  return {r['step']: r['loss'] for r in metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if r['split'] == 'train' and 'loss' in r}


@pytest.fixture(scope='module')
def reference(small_corpus, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = train.train_and_evaluate(tiny_config(small_corpus), workdir)
  return workdir, result


# The tests of the `reference` run (30 steps, then resumed, killed, evaluated, exported) are
# end-to-end: `slow`. The fast loop keeps the step's own tests below them.
@pytest.mark.slow
def test_training_learns_and_writes_its_outputs(reference):
  workdir, result = reference
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 0.5
  assert result['bpc'] > 0 and np.isfinite(result['bpc'])
  assert result['perplexity'] == pytest.approx(np.exp(result['loss']), rel=1e-6)
  records = metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  train_rec = [r for r in records if r['split'] == 'train']
  assert {'lr', 'grad_norm', 'tokens_per_s', 'mfu'} <= set(train_rec[0])
  assert train_rec[0]['lr'] == pytest.approx(0.0)   # warmup starts at 0
  assert [r['step'] for r in records if r['split'] == 'val'] == [10, 20, 30]
  texts = [r for r in records if r['split'] == 'text' and 'greedy' in r]
  # The greedy continuation's longest run of one token: what a degenerate model inflates.
  runs = [r for r in records if r['split'] == 'sample']
  assert [r['step'] for r in texts] == [r['step'] for r in runs] == [10, 20, 30]
  assert all(1 <= r['greedy_longest_run'] <= 8 for r in runs)      # train.sample_tokens=8
  for name in ('loss_curve.png', 'config.json', 'tokenizer/tokenizer.json'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tb'))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  # Last 3 kept, plus the best by val loss (the latest eval here, so it is among them).
  assert steps == [20, 25, 30]


@pytest.mark.slow
def test_eval_command_matches_training_eval(reference):
  workdir, result = reference
  again = train.evaluate_workdir(workdir)
  assert again['step'] == STEPS
  assert again['loss'] == pytest.approx(result['loss'], abs=1e-6)
  assert again['bpc'] == pytest.approx(result['bpc'], abs=1e-6)


def run_cli(args, **kw):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def cli_args(small_corpus, workdir):
  c = tiny_config(small_corpus)
  flat = {'data.corpus': c.data.corpus, 'data.cache_dir': c.data.cache_dir,
          'data.val_fraction': 0.1, 'tokenizer.vocab_size': 512,
          'tokenizer.max_train_chars': 1_000_000, 'model.n_layer': 2, 'model.n_head': 4,
          'model.d_model': 64, 'model.seq_len': 32, 'model.tie_embeddings': False,
          'optim.name': 'muon', 'optim.lr': 3e-3, 'optim.warmup_steps': 3}
  flat.update({f'train.{k}': v for k, v in c.train.items()})
  return ['--config', os.path.join(ROOT, 'configs', 'tiny.py') + ':gpt2', '--workdir', workdir] + [
      f'--config.{k}={v}' for k, v in flat.items()]


def wait_for_train_records(workdir, n, proc, timeout=240):
  path = os.path.join(workdir, 'metrics.jsonl')
  end = time.time() + timeout
  while time.time() < end and proc.poll() is None:
    if len(train_losses(workdir)) >= n:
      return
    time.sleep(0.05)
  raise AssertionError(f'no {n} train records: {proc.communicate()[0][-2000:]}')


@pytest.mark.slow
def test_sigterm_saves_and_resume_is_exact(reference, small_corpus, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / 'run')
  proc = run_cli(cli_args(small_corpus, workdir))
  wait_for_train_records(workdir, 7, proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-2000:]
  assert 'SIGTERM: saved step' in out and 'run the same command to resume' in out
  stopped = max(train_losses(workdir))
  assert stopped < STEPS
  assert str(stopped) in os.listdir(os.path.join(workdir, 'checkpoints'))
  train.train_and_evaluate(tiny_config(small_corpus), workdir)
  # Bitwise: same data order, same RNG, same updates.
  assert train_losses(workdir) == train_losses(ref_dir)


@pytest.mark.slow
def test_kill_9_never_leaves_a_loadable_partial_checkpoint(reference, small_corpus, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / 'run')
  proc = run_cli(cli_args(small_corpus, workdir))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  # Kill as soon as a save has begun: orbax's temporary directory exists.
  end = time.time() + 240
  while time.time() < end and proc.poll() is None:
    if os.path.isdir(ckpt_dir) and any('tmp' in n for n in os.listdir(ckpt_dir)):
      break
    time.sleep(0.005)
  proc.kill()
  proc.communicate()
  train.train_and_evaluate(tiny_config(small_corpus), workdir)
  assert train_losses(workdir) == train_losses(ref_dir)


@pytest.mark.slow
def test_resume_refuses_a_different_model_and_extends_steps(reference, small_corpus, tmp_path):
  ref_dir, _ = reference
  workdir = str(tmp_path / 'run')
  import shutil
  shutil.copytree(ref_dir, workdir)
  bad = tiny_config(small_corpus)
  bad.model.n_layer = 3
  with pytest.raises(UserError, match=r'model.n_layer: 2 -> 3'):
    train.train_and_evaluate(bad, workdir)
  longer = tiny_config(small_corpus, steps=STEPS + 5, eval_every=100)
  train.train_and_evaluate(longer, workdir)
  losses = train_losses(workdir)
  assert max(losses) == STEPS + 5
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert steps[-1] == STEPS + 5


LATER_START = """
import sys
import jax, jax.numpy as jnp
from zhgpt_jax import parallel
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
parallel.use_compile_cache(sys.argv[1], sys.argv[2])
print(float(jax.jit(lambda x: jnp.tanh(x) * 7.0 + 3.0)(jnp.arange(5.0)).sum()))
print('/jax/compilation_cache/cache_hits' in events)
"""


def test_a_later_start_loads_compiled_programs_from_the_cache(tmp_path, monkeypatch):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  data = str(tmp_path / 'data')
  later = lambda setting: subprocess.run(
      [sys.executable, '-c', LATER_START, setting, data], cwd=ROOT, capture_output=True,
      text=True, check=True).stdout.split()
  try:
    assert parallel.use_compile_cache('auto', data) == os.path.join(data, 'jax_cache')
    want = float(jax.jit(lambda x: jnp.tanh(x) * 7.0 + 3.0)(jnp.arange(5.0)).sum())
    assert any(n.startswith('jit__lambda') for n in os.listdir(os.path.join(data, 'jax_cache')))
    assert later('auto') == [repr(want), 'True']     # loaded, not compiled, same result
    assert later('') == [repr(want), 'False']        # off: compiled again
    parallel.use_compile_cache('', data)
    before = set(os.listdir(os.path.join(data, 'jax_cache')))
    jax.jit(lambda x: x * 5.0 - 1.0)(jnp.arange(3.0)).block_until_ready()
    assert set(os.listdir(os.path.join(data, 'jax_cache'))) == before
    # A cache directory set outside zhgpt-jax (jax.config, $JAX_COMPILATION_CACHE_DIR) stays.
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'theirs'))
    assert parallel.use_compile_cache('auto', data) == str(tmp_path / 'theirs')
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'theirs')
  finally:
    parallel.use_compile_cache('', data)


def test_non_finite_step_leaves_params_untouched():
  c = default_config('tiny')
  c.model.update(n_layer=1, n_head=2, d_model=32, seq_len=8, tie_embeddings=False)
  c.optim.warmup_steps = 10
  c.train.steps = 100
  cfg = M.model_config(c.model, 100)
  opt, step = train.make_train_step(c, cfg)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  # A NaN embedding row poisons exactly the sequences that contain token 7.
  params['wte']['embedding'] = params['wte']['embedding'].at[7].set(jnp.nan)
  state = train.new_state(opt, params, 0)
  rep = jax.tree.map(lambda x: np.asarray(x)[None], state)
  poisoned = np.full((1, 1, 2, 9), 7, np.int32)
  clean = np.tile(np.arange(10, 19, dtype=np.int32), (1, 1, 2, 1))
  batch = lambda x: {'inputs': x[..., :-1], 'targets': x[..., 1:]}

  after_bad, m_bad = step(rep, batch(poisoned))
  assert float(m_bad['skipped'][0]) == 1.0 and not np.isfinite(float(m_bad['loss'][0]))
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(after_bad['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[0])
  before = jax.tree.map(lambda x: np.asarray(x)[0], after_bad)
  after_good, m_good = step(after_bad, batch(clean))
  assert float(m_good['skipped'][0]) == 0.0
  # The skipped step did not advance the optimizer; the good one does (its moments move).
  changed = [not np.array_equal(a, np.asarray(b)[0]) for a, b in
             zip(jax.tree.leaves(before['opt_state']), jax.tree.leaves(after_good['opt_state']))]
  assert any(changed)
  for a, b in zip(jax.tree.leaves(state['opt_state']), jax.tree.leaves(before['opt_state'])):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_consecutive_non_finite_steps_stop_the_run():
  writer = metrics.MetricsWriter('', enabled=False)
  dp = parallel.Pmap()
  bad = (5, {'skipped': jnp.ones((1,))})
  good = (6, {'skipped': jnp.zeros((1,))})
  assert train._check(*bad, dp, 0, 3, writer) == 1
  assert train._check(*good, dp, 1, 3, writer) == 0
  with pytest.raises(UserError, match='3 consecutive non-finite steps'):
    train._check(*bad, dp, 2, 3, writer)


def test_short_context_keeps_the_tokens():
  x = np.arange(2 * 3 * 32).reshape(1, 2, 3, 32)
  cut = train.short_context({'inputs': x}, 8)['inputs']
  assert cut.shape == (1, 2, 12, 8)
  np.testing.assert_array_equal(cut.reshape(x.shape), x)


@pytest.mark.slow
def test_cli_eval_sample_and_export(reference, tmp_path):
  workdir, result = reference
  out = run_cli(['eval', '--workdir', workdir]).communicate(timeout=300)[0]
  assert f'step {STEPS}: loss {result["loss"]:.4f}' in out, out[-2000:]
  out = run_cli(['sample', '--workdir', workdir, '--prompt', '村民们都很高兴',
                 '--config.sample.max_new_tokens=6', '--config.sample.temperature=0']
                ).communicate(timeout=300)[0]
  assert out.splitlines()[-1].startswith('村民们都很高兴'), out[-2000:]
  hf_dir = str(tmp_path / 'hf')
  proc = run_cli(['export', '--workdir', workdir, '--out', hf_dir])
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-2000:]
  assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(os.listdir(hf_dir))
  proc = run_cli(['export', '--workdir', workdir, '--out', hf_dir])
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 2 and 'overwrite' in out, out[-2000:]
  # GGUF (the README's command): a q8_0 file and its Ollama Modelfile; read back by gguf.
  gguf_path = str(tmp_path / 'tiny.gguf')
  proc = run_cli(['export', '--workdir', workdir, '--out', gguf_path, '--format', 'gguf',
                  '--gguf_type', 'q8_0'])
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and 'gguf: gpt2, q8_0' in out, out[-2000:]
  import gguf
  fields = gguf.GGUFReader(gguf_path).fields
  assert fields['general.architecture'].contents() == 'gpt2'
  assert fields['general.file_type'].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
  with open(str(tmp_path / 'tiny.Modelfile'), encoding='utf-8') as f:
    assert f.readline() == 'FROM ./tiny.gguf\n'
  proc = run_cli(['export', '--workdir', workdir, '--out', gguf_path])
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 2 and 'pass --format gguf' in out, out[-2000:]
  empty = str(tmp_path / 'empty')
  os.makedirs(empty)
  proc = run_cli(['export', '--config', os.path.join(ROOT, 'configs', 'tiny.py') + ':gpt2', '--workdir',
                  empty, '--out', str(tmp_path / 'hf2')])
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 2 and 'no checkpoints' in out, out[-2000:]


@pytest.mark.parametrize('tie, cap', [pytest.param(True, 0.0, marks=pytest.mark.slow),
                                      (False, 0.0),
                                      pytest.param(False, 0.1, marks=pytest.mark.slow)])
def test_chunked_cross_entropy_equals_full_logits(tie, cap):
  """loss_chunk > 0 gives the same loss and gradients as the full [tokens, vocab] logits
  (soft-capped ones too: a cap of 0.1 bends logits of init size, ~0.1)."""
  c = default_config('tiny')
  c.model.update(n_layer=1, n_head=2, d_model=32, seq_len=16, tie_embeddings=tie,
                 logit_softcap=cap)
  cfg = M.model_config(c.model, 300)            # padded to 384 columns
  model = M.GPT(cfg)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 300, (3, 17)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'weights': (rng.random((3, 16)) < 0.7).astype(np.float32)}
  # 48 tokens in chunks of 20: the last chunk is padded.
  full = jax.value_and_grad(loss_lib.loss_fn, has_aux=True)(params, model, batch, None, False)
  chunked = jax.value_and_grad(loss_lib.loss_fn, has_aux=True)(params, model, batch, None, False,
                                                             20)
  (loss_f, _), grads_f = full
  (loss_c, _), grads_c = chunked
  assert 5.0 < float(loss_f) < 6.5                # ~ln(384) at init
  np.testing.assert_allclose(float(loss_c), float(loss_f), rtol=1e-6)
  for gf, gc in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(np.asarray(gc), np.asarray(gf), rtol=1e-4, atol=1e-7)
  # The eval step agrees too (summed cross-entropy and weight).
  rep = jax.tree.map(lambda x: np.asarray(x)[None], params)
  one = jax.tree.map(lambda x: x[None], batch)
  s_full, n_full, _ = train.make_eval_step(cfg)(rep, one)
  s_chunk, n_chunk, _ = train.make_eval_step(cfg, 20)(rep, one)
  np.testing.assert_allclose(float(s_chunk[0]), float(s_full[0]), rtol=1e-6)
  assert float(n_chunk[0]) == float(n_full[0]) == batch['weights'].sum()
