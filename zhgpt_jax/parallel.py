"""The one place that knows how work is spread over devices and hosts.

Data parallelism with `jax.pmap` over the local devices (axis 'batch'); with several
processes the same pmapped step spans every device of every host. A jit + NamedSharding
(FSDP) strategy would replace the four helpers below and nothing else.
"""

from __future__ import annotations

import os

import jax
import numpy as np

AXIS = 'batch'


def initialize(dist_cfg) -> None:
  """Joins a multi-process run when one is configured (config.dist or the environment).

  Single-process runs need nothing. Otherwise the coordinator address, process count and
  id come from config.dist, else from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, else from what jax.distributed detects itself (SLURM, for example).
  """
  coordinator = dist_cfg.coordinator or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  num = dist_cfg.num_processes or int(os.environ.get('JAX_NUM_PROCESSES', '0'))
  pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else int(os.environ.get('JAX_PROCESS_ID', '-1'))
  in_slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  if not coordinator and not in_slurm:
    return
  if jax.distributed.is_initialized():
    return
  # CPU devices need a collectives backend to talk across processes; GPUs use NCCL.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = dict(initialization_timeout=dist_cfg.timeout_s,
                heartbeat_timeout_seconds=dist_cfg.timeout_s)
  if coordinator:
    kwargs.update(coordinator_address=coordinator, num_processes=num or None,
                  process_id=pid if pid >= 0 else None)
  # Said before joining: a process whose peers never come is aborted by jax after timeout_s.
  print(f'joining a multi-process run via {coordinator or "SLURM"}; waiting up to '
        f'{dist_cfg.timeout_s}s for every process', flush=True)
  jax.distributed.initialize(**kwargs)
  # gloo (CPU) gives up after 30 s at the first collective of a device group whose peers are
  # late. Meet at both groups used later (all devices; one per process, for barriers) now,
  # while every process is here, so later waits (process 0 preparing data) may be long.
  ones = np.ones(jax.local_device_count(), np.float32)
  jax.pmap(lambda x: jax.lax.psum(x, AXIS), axis_name=AXIS)(ones).block_until_ready()
  sync('initialize')


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
