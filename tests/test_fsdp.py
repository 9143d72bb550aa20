"""The sharded strategy (parallel.strategy='fsdp') against pmap, and checkpoints across layouts.

The placement rule, with and without expert parallelism (an MoE layer's expert stacks and
their optimizer moments on 'expert'; tests/test_moe.py trains under it).

In one 8-device process: fsdp (data=2 x fsdp=4) and pmap on 1 device take the same 3 steps
of AdamW and of Muon to the same losses and parameters; at fsdp=8 each device holds 1/8 of
the parameters and optimizer state; a pmap checkpoint resumes under fsdp.

Through `main.py` (the real loop, grain state included): an uninterrupted fsdp=8 run; the
same on 2 processes x 4 devices (gloo on localhost); resumed from its step-3 checkpoint at
data=2 x fsdp=4 and at pmap on 1 device, the next 5 losses equal the uninterrupted run's; and
eval, sampling and export read the fsdp workdir.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from helpers import devices_env, free_port
from zhgpt_jax import checkpoint, export, metrics, model as M, parallel, sample, train
from zhgpt_jax.config import UserError, default_config, validate

pytestmark = pytest.mark.multiprocess  # subprocesses on simulated devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SAVED = 8, 3    # the runs below: 8 steps, resumed from the checkpoint at step 3
PDB = 2                # per-device batch on 8 devices: a global batch of 16

# ----------------------------------------------------------------------------- the rule, the mesh


def test_mesh_shape_fills_the_rest_and_says_what_does_not_fit():
  p = default_config().parallel
  p.update(strategy='fsdp', data=2, fsdp=-1)
  assert parallel.mesh_shape(p, 8) == (2, 4, 1)
  p.update(data=-1, fsdp=4, expert=1)
  assert parallel.mesh_shape(p, 8) == (2, 4, 1)
  p.update(data=1, fsdp=-1, expert=2)
  assert parallel.mesh_shape(p, 8) == (1, 4, 2)
  p.update(data=3, fsdp=-1, expert=1)
  with pytest.raises(UserError, match=r'parallel.data=3 x parallel.fsdp=-1 x parallel.expert=1: '
                     r'8 devices are not a multiple of 3'):
    parallel.mesh_shape(p, 8)
  p.update(data=2, fsdp=2, expert=1)
  with pytest.raises(UserError, match='= 4 devices, but this run has 8'):
    parallel.mesh_shape(p, 8)


def test_one_rule_splits_the_largest_dimension_the_fsdp_size_divides():
  mesh = jax.sharding.AbstractMesh((2, 4, 1), parallel.MESH_AXES)
  spec = parallel.Sharded(mesh).spec
  P = jax.sharding.PartitionSpec
  assert spec((768, 3072)) == P(None, 'fsdp')        # a kernel: its wider side
  assert spec((50304, 768)) == P('fsdp', None)       # the token table
  assert spec((1024, 1024)) == P('fsdp', None)       # equal sides: the first
  assert spec((8, 768, 256)) == P(None, 'fsdp', None)  # an expert stack
  assert spec((768,)) == P('fsdp')                   # biases and norms too
  assert spec((6, 10)) == P() and spec(()) == P()    # nothing divisible: replicated


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_the_rule_puts_every_expert_stack_on_the_expert_axis(optimizer):
  """With expert=4: an MoE layer's w_gate/w_up/w_down, and their optimizer moments found
  inside the optax state by path, split E over 'expert' and another dimension over 'fsdp';
  everything else, the expert bias and router included, keeps the fsdp rule."""
  from helpers import tiny_cfg
  from zhgpt_jax import optim
  c = default_config('tiny')
  c.optim.update(name=optimizer, warmup_steps=1)
  cfg = tiny_cfg(position='rope', mlp='moe', norm='rmsnorm', bias=False,
                 moe=dict(n_routed=8, balance='bias', first_dense=1))
  opt = optim.make_optimizer(c.optim, 10)
  state = jax.eval_shape(lambda r: train.new_state(opt, M.init_params(cfg, r), 0),
                         jax.random.PRNGKey(0))
  P = jax.sharding.PartitionSpec
  strategy = parallel.Sharded(jax.sharding.AbstractMesh((1, 2, 4), parallel.MESH_AXES))
  flat = {jax.tree_util.keystr(k): (x.shape, strategy.spec(x.shape, k))
          for k, x in jax.tree_util.tree_leaves_with_path(state)}
  on_experts = {k: s for k, (_, s) in flat.items() if 'expert' in s}
  # Each stack in params and its moments: Adam's mu and nu, or Muon's momentum.
  assert len(on_experts) == 3 * {'adamw': 3, 'muon': 2}[optimizer], sorted(on_experts)
  for key, s in on_experts.items():
    assert re.search(r"\['h_1'\]\['moe'\]\['w_(gate|up|down)'\]$", key), key
    shape = flat[key][0]   # [8, 64, 128] or [8, 128, 64]: E on expert, the widest other on fsdp
    assert s == P('expert', *('fsdp' if d == max(shape[1:]) else None for d in shape[1:])), key
  plain = parallel.Sharded(jax.sharding.AbstractMesh((4, 2, 1), parallel.MESH_AXES))
  for key, (shape, s) in flat.items():
    if key not in on_experts:   # as without expert parallelism
      assert s == plain.spec(shape), key
  assert flat["['params']['h_1']['moe']['expert_bias']"][1] == P('fsdp')
  # 3 does not divide 8 experts: one line naming both keys, before anything is placed.
  three = parallel.Sharded(jax.sharding.AbstractMesh((1, 1, 3), parallel.MESH_AXES))
  with pytest.raises(UserError, match=r'parallel.expert=3 must divide .*model.moe.n_routed=8'):
    three.shardings(state)
  config = default_config('tiny')
  config.model.mlp = 'moe'
  config.parallel.update(strategy='fsdp', expert=3)
  with pytest.raises(UserError, match=r'config.parallel.expert=3: must divide '
                     r'model.moe.n_routed=8'):
    validate(config)
  config.parallel.update(strategy='pmap', expert=2)
  with pytest.raises(UserError, match='config.parallel.expert=2: expert parallelism needs '
                     '--config.parallel.strategy=fsdp'):
    validate(config)


# ----------------------------------------------------------------------------- one process, 8 devices

SCRIPT = textwrap.dedent('''
    import tempfile
    import jax, numpy as np
    from zhgpt_jax import checkpoint, model as M, optim, parallel, train
    from zhgpt_jax.config import default_config
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 200, (16, 17)).astype(np.int32) for _ in range(4)]

    def setup(name):
      c = default_config('tiny')
      c.model.update(n_layer=2, n_head=4, d_model=64, seq_len=16)
      c.optim.update(name=name, lr=1e-2, warmup_steps=1)
      c.train.update(steps=10, loss_chunk=0)
      cfg = M.model_config(c.model, 200)
      opt = optim.make_optimizer(c.optim, 10)
      fresh = lambda r: train.new_state(opt, M.init_params(cfg, r), 0)
      make = lambda s: train.make_train_step(c, cfg, s)[1]
      return fresh, make

    def fsdp(data, size):
      c = default_config().parallel
      c.update(strategy='fsdp', data=data, fsdp=size)
      return parallel.make(c)

    def steps(strategy, make, state, which):
      step, n, losses = make(strategy), strategy.local_devices, []
      for b in which:
        x = b.reshape(n, 1, 16 // n, 17)   # [devices, accum, per-device batch, T + 1]
        state, m = step(state, strategy.put_batch({'inputs': x[..., :-1], 'targets': x[..., 1:]}))
        losses.append(float(strategy.to_host(m['loss'])))
      return losses, state

    def same_params(a, b):
      # rtol 1e-5, with an absolute floor: the key bias has a zero true gradient (softmax
      # ignores a shift shared by all keys), so Adam turns its float noise into ~1e-5 steps.
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=3e-5)

    one = parallel.Pmap(devices=tuple(jax.local_devices()[:1]))
    for name in ('adamw', 'muon'):
      fresh, make = setup(name)
      sharded = fsdp(2, 4)
      key = jax.random.PRNGKey(0)
      l1, s1 = steps(one, make, one.init_state(fresh, key), batches[:3])
      l8, s8 = steps(sharded, make, sharded.init_state(fresh, key), batches[:3])
      print(name, 'pmap x 1', l1, 'fsdp 2 x 4', l8)
      np.testing.assert_allclose(l1, l8, rtol=1e-5)
      same_params(one.to_host(s1['params']), sharded.to_host(s8['params']))

      # fsdp=8: each device holds 1/8 of the parameters and optimizer state (+ what no
      # dimension divisible by 8 lets it split: the step counter, Adam's count).
      whole = fsdp(1, 8).init_state(fresh, key)
      held = {k: whole[k] for k in ('params', 'opt_state')}
      total = sum(x.nbytes for x in jax.tree.leaves(held))
      per_device = parallel.bytes_per_device(held)
      print(name, 'bytes per device', per_device, 'of', total, f'= 1/{total / per_device:.2f}')
      assert per_device <= total / 8 * 1.05

      # A pmap checkpoint resumes under fsdp: step 4 from the saved step 3 is the same.
      with tempfile.TemporaryDirectory() as d:
        ckpt = checkpoint.Checkpointer(d, keep=1, async_save=False)
        ckpt.save(3, one.savable(s1), None, {'step': 3})
        ckpt.close()
        abstract = jax.eval_shape(fresh, key)
        ckpt = checkpoint.Checkpointer(d, keep=1, async_save=False)
        restored, _ = ckpt.restore(3, sharded.restore_target(abstract))
        ckpt.close()
      l_one, s_one = steps(one, make, s1, batches[3:])
      l_back, s_back = steps(sharded, make, sharded.put_state(restored), batches[3:])
      print(name, 'step 4: pmap', l_one, 'fsdp from the pmap checkpoint', l_back)
      np.testing.assert_allclose(l_one, l_back, rtol=1e-5)
      same_params(one.to_host(s_one['params']), sharded.to_host(s_back['params']))
    print('OK')
''')


def test_fsdp_matches_one_device_and_splits_the_state():
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=devices_env(8), capture_output=True, text=True,
                       timeout=600)
  print(out.stdout)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'OK' in out.stdout


# ----------------------------------------------------------------------------- main.py runs

def launch(tiny_data, shared, workdir, devices, overrides, dist=None):
  """main.py training on the tiny corpus with `devices` simulated devices; returns the Popen."""
  c = tiny_data.config
  flat = {f'data.{k}': v for k, v in c.data.items()}
  flat.update({f'tokenizer.{k}': v for k, v in c.tokenizer.items()})
  flat.update({f'model.{k}': c.model[k] for k in ('n_layer', 'n_head', 'd_model', 'seq_len',
                                                   'vocab_multiple')})
  flat.update({'data.cache_dir': tiny_data.data_dir, 'optim.warmup_steps': 2,
               'optim.min_lr_ratio': 1.0, 'train.steps': STEPS, 'train.short_seq_steps': 0,
               'train.log_every': 1, 'train.ckpt_every': SAVED, 'train.eval_every': STEPS,
               'train.eval_max_batches': 0, 'train.eval_batch': 2, 'train.peak_flops': 1e11,
               'train.sample_tokens': 0, 'train.per_device_batch': PDB,
               'parallel.strategy': 'fsdp', **overrides})
  for i, extra in enumerate(dist or [[]]):
    args = ['--config', os.path.join(ROOT, 'configs', 'tiny.py') + ':gpt2', '--workdir', workdir,
            *[f'--config.{k}={v}' for k, v in flat.items()], *extra]
    env = devices_env(devices, JAX_COMPILATION_CACHE_DIR=str(shared / 'xla_cache'),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    log = open(f'{workdir}-{i}.log', 'w')
    yield subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *args], env=env,
                           stdout=log, stderr=subprocess.STDOUT)


def wait(procs, workdir):
  for i, p in enumerate(procs):
    rc = p.wait(timeout=600)
    with open(f'{workdir}-{i}.log', encoding='utf-8', errors='replace') as f:
      log = f.read()
    assert rc == 0, log[-3000:]
  with open(f'{workdir}-0.log', encoding='utf-8', errors='replace') as f:
    return f.read()


def records(workdir, split):
  return [r for r in metrics.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
          if r['split'] == split]


def resumable_copy(src, dst):
  """`src` as it was when step SAVED was its latest checkpoint."""
  shutil.copytree(src, dst)
  for step in os.listdir(os.path.join(dst, 'checkpoints')):
    if step.isdigit() and int(step) > SAVED:
      shutil.rmtree(os.path.join(dst, 'checkpoints', step))
  os.remove(os.path.join(dst, 'metrics.jsonl'))


@pytest.fixture(scope='module')
def runs(tiny_data, tmp_path_factory):
  shared = tmp_path_factory.mktemp('fsdp')
  ref, mh = str(shared / 'fsdp8'), str(shared / 'mh')
  port = free_port()
  dist = [[f'--config.dist.coordinator=127.0.0.1:{port}', '--config.dist.num_processes=2',
           f'--config.dist.process_id={i}'] for i in range(2)]
  # The uninterrupted fsdp=8 run (with eval-time samples) and the 2 x 4 run, side by side.
  first = [*launch(tiny_data, shared, ref, 8, {'train.sample_tokens': 4}),
           *launch(tiny_data, shared, mh, 4, {'train.steps': 4}, dist)]
  out = {'ref_log': wait(first[:1], ref)}
  wait(first[1:], mh)
  layouts = {'data2_fsdp4': (8, {'parallel.data': 2, 'parallel.fsdp': 4}),
             'pmap1': (1, {'parallel.strategy': 'pmap', 'train.per_device_batch': 8 * PDB})}
  resumed, procs = {}, {}
  for name, (devices, overrides) in layouts.items():    # the same global batch in each
    resumed[name] = str(shared / name)
    resumable_copy(ref, resumed[name])
    procs[name] = list(launch(tiny_data, shared, resumed[name], devices, overrides))
  out['resumed_logs'] = {n: wait(p, resumed[n]) for n, p in procs.items()}
  return dict(out, ref=ref, mh=mh, resumed=resumed)


def losses(workdir):
  return {r['step']: r['loss'] for r in records(workdir, 'train')}


def test_two_hosts_match_one(runs):
  ref, mh = losses(runs['ref']), losses(runs['mh'])
  assert sorted(mh) == [1, 2, 3, 4]
  for step in mh:
    assert mh[step] == pytest.approx(ref[step], rel=1e-5), step


def test_a_fsdp_checkpoint_resumes_in_other_layouts(runs):
  ref = losses(runs['ref'])
  assert sorted(ref) == list(range(1, STEPS + 1))
  ref_val = records(runs['ref'], 'val')[0]['loss']
  for name, workdir in runs['resumed'].items():
    log = runs['resumed_logs'][name]
    assert f'resuming from step {SAVED}' in log, log[-2000:]
    got = losses(workdir)
    assert sorted(got) == list(range(SAVED + 1, STEPS + 1)), name     # the next 5 steps
    for step, loss in got.items():
      assert loss == pytest.approx(ref[step], rel=1e-5), (name, step)
    # The whole val split: the same parameters give the same val loss in any layout.
    assert records(workdir, 'val')[0]['loss'] == pytest.approx(ref_val, rel=1e-5), name
  assert 'parallel: pmap over 1 devices' in runs['resumed_logs']['pmap1']
  assert 'parallel: fsdp mesh data=2 x fsdp=4 x expert=1' in runs['resumed_logs']['data2_fsdp4']


def test_the_fsdp_run_reports_its_layout_and_samples(runs):
  log = runs['ref_log']
  line = next(x for x in log.splitlines() if x.startswith('parallel: '))
  assert line.startswith('parallel: fsdp mesh data=1 x fsdp=8 x expert=1'), line
  per_device, whole = (float(x.split(' MiB')[0].split()[-1].replace(',', ''))
                       for x in line.split('train state ')[1].split('device ('))
  assert per_device < whole / 7, line
  assert [r['step'] for r in records(runs['ref'], 'sample')] == [STEPS]


def test_eval_sample_and_export_read_a_fsdp_workdir(runs, tmp_path):
  """Here (one device) from a workdir that 8 devices wrote in fsdp layout."""
  ref = runs['ref']
  result = train.evaluate_workdir(ref)
  assert result['step'] == STEPS
  assert result['loss'] == pytest.approx(records(ref, 'val')[0]['loss'], rel=1e-5)
  cfg, params, tokenizer, config, _ = checkpoint.load_model(ref)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
  assert M.count_params(params) == M.count_params(M.init_params(cfg, jax.random.PRNGKey(0)))
  sample_cfg = config.sample.copy_and_resolve_references()
  sample_cfg.update(max_new_tokens=4, temperature=0.0)
  text = sample.generate_text(cfg, params, tokenizer, ['村民们'], sample_cfg)[0]
  assert isinstance(text, str)
  out = str(tmp_path / 'hf')
  export.export_workdir(ref, out)
  assert os.path.exists(os.path.join(out, 'config.json'))
