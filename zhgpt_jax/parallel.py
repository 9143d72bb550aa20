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
    kwargs.update(coordinator_address=coordinator, num_processes=num, process_id=pid)
  jax.distributed.initialize(**kwargs)


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
