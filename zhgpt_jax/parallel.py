"""The one place that knows how work is spread over devices and hosts.

A strategy places the train state and batches on devices and compiles the steps; the train
loop, eval and checkpointing touch device arrays only through its methods:

  put_state(tree)       host pytree (train state or params) -> device arrays in its layout
  put_batch(batch)      a host batch of a data.Task ([local devices, ...] numpy) -> step input
  to_host(tree)         device arrays -> host numpy of the one logical value (no device axis);
                        on every process, e.g. for checkpoints, logs and eval-time sampling
  compile(fn, donate=False)
                        a step written for one device's share -> the compiled step on all
                        devices (donate: the first argument's buffers are reused)
  mean(tree), sum(tree) inside a step: over all devices' shares (the global batch)
  device_index()        inside a step: this device's number (per-device dropout RNG)

`Pmap` is data parallelism with `jax.pmap` over the local devices (axis 'batch'); with
several processes the same pmapped step spans every device of every host. Parameters are
replicated, a replica's batch is [grad_accum, per_device_batch, seq_len]. A sharded strategy
(jit over a Mesh with NamedSharding) implements the same methods, with `mean`/`sum` the
identity (its step sees the global batch) and `device_index` 0; `make` picks one.

Also here: joining a multi-process run (`initialize`), barriers (`sync`), and the
cross-process pre-emption and peer-failure checks.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np

from zhgpt_jax.config import UserError

AXIS = 'batch'


def initialize(dist_cfg) -> None:
  """Joins a multi-process run when one is configured (config.dist or the environment).

  Single-process runs need nothing; see `distributed_args` for where the settings come from.
  """
  kwargs = distributed_args(dist_cfg, os.environ)
  if kwargs is None:
    return
  if jax.distributed.is_initialized():
    return
  # CPU devices need a collectives backend to talk across processes; GPUs use NCCL.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  gpus = kwargs.get('local_device_ids')
  # Said before joining: a process whose peers never come is aborted by jax after timeout_s.
  print(f'joining a multi-process run via {kwargs.get("coordinator_address", "SLURM")}; '
        f'waiting up to {dist_cfg.timeout_s}s for every process'
        + (f'; this task drives GPUs {",".join(map(str, gpus))}' if gpus else ''), flush=True)
  jax.distributed.initialize(**kwargs)
  # gloo (CPU) gives up after 30 s at the first collective of a device group whose peers are
  # late. Meet at both groups used later (all devices; one per process, for barriers) now,
  # while every process is here, so later waits (process 0 preparing data) may be long.
  ones = np.ones(jax.local_device_count(), np.float32)
  jax.pmap(lambda x: jax.lax.psum(x, AXIS), axis_name=AXIS)(ones).block_until_ready()
  sync('initialize')


# What jax.distributed looks for to detect SLURM (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')


def distributed_args(dist_cfg, env) -> dict | None:
  """jax.distributed.initialize's keyword arguments for this process; None with one process.

  The coordinator address, process count and id come from config.dist, else from
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (`env`), else jax detects
  them itself (SLURM, when it runs more than one task). Raises UserError when a coordinator
  is given without the count and id and there is nothing to detect them from.
  """
  coordinator = dist_cfg.coordinator or env.get('JAX_COORDINATOR_ADDRESS', '')
  num = dist_cfg.num_processes or int(env.get('JAX_NUM_PROCESSES', '0'))
  pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else int(env.get('JAX_PROCESS_ID', '-1'))
  in_slurm = all(v in env for v in _SLURM_VARS)
  if not coordinator and not (in_slurm and int(env['SLURM_NTASKS']) > 1):
    return None
  if coordinator and not in_slurm and (num < 1 or pid < 0):
    raise UserError(f'dist.coordinator={coordinator}: also give --config.dist.num_processes and '
                    '--config.dist.process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)')
  kwargs = dict(initialization_timeout=dist_cfg.timeout_s,
                heartbeat_timeout_seconds=dist_cfg.timeout_s)
  if coordinator:
    kwargs.update(coordinator_address=coordinator, num_processes=num or None,
                  process_id=pid if pid >= 0 else None)
  gpus = slurm_local_device_ids(env) if in_slurm else None
  if gpus is not None:
    kwargs['local_device_ids'] = gpus
  return kwargs


def slurm_local_device_ids(env) -> list[int] | None:
  """Every GPU a SLURM task sees, when it is its node's only task; None to leave jax's choice.

  Under SLURM, jax gives each task one GPU, the one numbered SLURM_LOCALID: right for one
  task per GPU, but a single task per node would drive GPU 0 alone. The GPUs a task sees are
  CUDA_VISIBLE_DEVICES (set by SLURM to the node's allocated GPUs, which CUDA then numbers
  0, 1, ...), else SLURM_GPUS_ON_NODE. JAX_LOCAL_DEVICE_IDS, when set, wins.
  """
  if env.get('JAX_LOCAL_DEVICE_IDS') or _slurm_tasks_on_node(env) != 1:
    return None
  visible = [d.strip() for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  if any(d.startswith('-') or d == 'NoDevFiles' for d in visible):   # no GPU allocated
    return None
  n = len(visible) or int(env.get('SLURM_GPUS_ON_NODE', '0') or 0)
  return list(range(n)) if n > 1 else None


def _slurm_tasks_on_node(env) -> int | None:
  """This step's tasks on this node: SLURM_STEP_TASKS_PER_NODE is e.g. '1(x4)' or '2(x3),1'."""
  spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE', '')
  counts = []
  for part in spec.split(','):
    m = re.fullmatch(r'(\d+)(?:\(x(\d+)\))?', part.strip())
    if not m:
      return None
    counts += [int(m[1])] * int(m[2] or 1)
  if len(set(counts)) == 1:
    return counts[0]
  node = int(env.get('SLURM_NODEID', '-1'))
  return counts[node] if 0 <= node < len(counts) else None


# Words of a runtime error that mean another process of the run died or stopped answering.
_PEER_LOST = ('gloo', 'nccl', 'connection reset', 'connection refused', 'broken pipe',
              'unavailable', 'deadline_exceeded', 'heartbeat', 'coordination service')


def peer_failure(e: BaseException) -> str | None:
  """One line for an error that means another process of a multi-process run is gone.

  Returns None for any other error, and in a single-process run.
  """
  if not jax.distributed.is_initialized() or not isinstance(e, jax.errors.JaxRuntimeError):
    return None
  first = (str(e).strip().splitlines() or [type(e).__name__])[0]
  if not any(w in first.lower() for w in _PEER_LOST):
    return None
  return (f'process {jax.process_index()} of {jax.process_count()}: another process of this '
          f'run died or stopped answering ({first}); see its log, then start every process '
          'again with the same command to resume from the last checkpoint')


def preempted(step: int) -> bool:
  """True on every process at the same step once any process got SIGTERM; False with one.

  Must be called at every step by every process (jax's preemption sync protocol).
  """
  if jax.process_count() == 1:
    return False
  from jax.experimental import multihost_utils
  return multihost_utils.reached_preemption_sync_point(step)


class Pmap:
  """Data parallelism: params replicated on every device, the batch split over them."""
  name = 'pmap'

  def put_state(self, tree):
    return replicate(tree)

  def put_batch(self, batch: dict) -> dict:
    return batch   # the pmapped step splits the leading (local devices) axis itself

  def to_host(self, tree):
    return unreplicate(tree)

  def compile(self, fn, donate: bool = False):
    return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,) if donate else ())

  def mean(self, tree):
    return jax.lax.pmean(tree, AXIS)

  def sum(self, tree):
    return jax.lax.psum(tree, AXIS)

  def device_index(self):
    return jax.lax.axis_index(AXIS)


def make(parallel_cfg=None) -> Pmap:
  """The strategy config.parallel asks for; data parallelism (`Pmap`) is the one so far."""
  del parallel_cfg
  return Pmap()


def replicate(tree):
  """Host pytree -> one copy per local device (leading axis = local devices)."""
  n = jax.local_device_count()
  return jax.pmap(lambda x: x, axis_name=AXIS)(
      jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree))


def unreplicate(tree):
  """The first local device's copy, as host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


def sync(name: str) -> None:
  """A barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


EXPERT_STACKS = ('w_gate', 'w_up', 'w_down')


def expert_specs(params):
  """PartitionSpecs for expert parallelism: each MoE layer's [E, ...] expert stacks split over
  the mesh's 'expert' axis, every other parameter replicated.

  Under `jax.set_mesh` of a mesh with an 'expert' axis (Auto axis types), model.MoE pins its
  [E, C, D] token blocks to the same axis, so each device runs its own experts on the rows
  routed to them; XLA moves the rows between the data and expert layouts.
  """
  from jax.sharding import PartitionSpec as P

  def spec(path, leaf):
    names = [getattr(p, 'key', None) for p in path]
    return P('expert') if 'moe' in names and names[-1] in EXPERT_STACKS else P()
  return jax.tree_util.tree_map_with_path(spec, params)
