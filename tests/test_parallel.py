"""Data parallelism: the pmapped step on 4 simulated devices equals 1 device, same global batch;
how a process finds the run it joins (flags, environment, SLURM)."""

import os
import subprocess
import sys
import textwrap

import pytest

from helpers import devices_env
from zhgpt_jax import parallel
from zhgpt_jax.config import UserError, default_config

pytestmark = pytest.mark.multiprocess  # subprocesses on simulated devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import jax, numpy as np
    from zhgpt_jax import model as M, train
    from zhgpt_jax.config import default_config
    assert jax.local_device_count() == 4
    c = default_config('tiny')
    c.model.update(n_layer=2, n_head=4, d_model=64, seq_len=16)
    c.optim.update(name=OPTIMIZER, lr=1e-2, warmup_steps=1)
    cfg = M.model_config(c.model, 200)
    c.train.steps = 10
    opt, step = train.make_train_step(c, cfg)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    state = train.new_state(opt, params, 0)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 200, (8, 17)).astype(np.int32) for _ in range(3)]

    def run(n):
      s = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)).copy(), state)
      losses = []
      for b in batches:
        x = b.reshape(n, 1, 8 // n, 17)   # [devices, accum, per-device batch, T + 1]
        s, m = step(s, {'inputs': x[..., :-1], 'targets': x[..., 1:]})
        losses.append(float(np.asarray(m['loss'])[0]))
      return losses, jax.tree.map(lambda x: np.asarray(x)[0], s['params'])

    l1, p1 = run(1)
    l4, p4 = run(4)
    print('losses', l1, l4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    flat1 = np.concatenate([x.ravel() for x in jax.tree.leaves(p1)])
    flat4 = np.concatenate([x.ravel() for x in jax.tree.leaves(p4)])
    print('param rel diff', np.linalg.norm(flat1 - flat4) / np.linalg.norm(flat1))
    assert np.linalg.norm(flat1 - flat4) <= 1e-5 * np.linalg.norm(flat1)
    # Elementwise too, with an absolute floor: the key bias has a zero true gradient (softmax
    # ignores a shift shared by all keys), so Adam turns its float noise into ~1e-5 steps.
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)
    print('OK')
''')


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_four_devices_match_one_device(optimizer):
  env = devices_env(4)
  script = SCRIPT.replace('OPTIMIZER', repr(optimizer))
  out = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'OK' in out.stdout


# ----------------------------------------------------------------------------- joining a run

SLURM = dict(SLURM_JOB_ID='77', SLURM_STEP_NODELIST='gpu[01-04]', SLURM_NTASKS='4',
             SLURM_PROCID='2', SLURM_LOCALID='0', SLURM_NODEID='2')


def dist(**overrides):
  d = default_config().dist
  d.update(overrides)
  return d


def test_distributed_args_from_flags_or_environment():
  assert parallel.distributed_args(dist(), {}) is None           # one process: nothing to join
  want = dict(coordinator_address='host0:12345', num_processes=2, process_id=1,
              initialization_timeout=300, heartbeat_timeout_seconds=300)
  flags = dist(coordinator='host0:12345', num_processes=2, process_id=1)
  assert parallel.distributed_args(flags, {}) == want
  env = dict(JAX_COORDINATOR_ADDRESS='host0:12345', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1')
  assert parallel.distributed_args(dist(), env) == want
  assert parallel.distributed_args(dist(process_id=0), env)['process_id'] == 0  # flags win
  with pytest.raises(UserError, match='also give --config.dist.num_processes'):
    parallel.distributed_args(dist(coordinator='host0:12345'), {})


@pytest.mark.parametrize('env, gpus', [
    # One task per node (srun --ntasks-per-node=1): all the GPUs SLURM gave it, which CUDA
    # numbers from 0 whatever their physical numbers.
    (dict(SLURM_STEP_TASKS_PER_NODE='1(x4)', CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'),
     list(range(8))),
    (dict(SLURM_STEP_TASKS_PER_NODE='1(x4)', CUDA_VISIBLE_DEVICES='4,5,6,7'), [0, 1, 2, 3]),
    (dict(SLURM_TASKS_PER_NODE='1(x4)', SLURM_GPUS_ON_NODE='4'), [0, 1, 2, 3]),
    (dict(SLURM_STEP_TASKS_PER_NODE='2(x2),1', CUDA_VISIBLE_DEVICES='0,1'), [0, 1]),  # node 2
    # jax's own choice, GPU SLURM_LOCALID: one task per GPU, or the user said, or no GPUs.
    (dict(SLURM_STEP_TASKS_PER_NODE='8(x4)', CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'), None),
    (dict(SLURM_STEP_TASKS_PER_NODE='2,2,1,2', SLURM_NODEID='0', CUDA_VISIBLE_DEVICES='0,1'),
     None),
    (dict(SLURM_STEP_TASKS_PER_NODE='1(x4)', CUDA_VISIBLE_DEVICES='0,1',
          JAX_LOCAL_DEVICE_IDS='0'), None),
    (dict(SLURM_STEP_TASKS_PER_NODE='1(x4)', CUDA_VISIBLE_DEVICES='0'), None),
    (dict(SLURM_STEP_TASKS_PER_NODE='1(x4)', CUDA_VISIBLE_DEVICES='NoDevFiles'), None),
    (dict(SLURM_STEP_TASKS_PER_NODE='1(x4)'), None),
])
def test_slurm_one_task_per_node_drives_every_gpu(env, gpus):
  args = parallel.distributed_args(dist(), dict(SLURM, **env))
  # The coordinator, process count and id are left to jax's SLURM detection.
  assert set(args) - {'local_device_ids'} == {'initialization_timeout',
                                               'heartbeat_timeout_seconds'}
  assert args.get('local_device_ids') == gpus


def test_slurm_with_one_task_is_a_single_process():
  assert parallel.distributed_args(dist(), dict(SLURM, SLURM_NTASKS='1')) is None
  partial = {k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'}  # not an srun step
  assert parallel.distributed_args(dist(), partial) is None
