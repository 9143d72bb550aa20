"""The one place that knows how work is spread over devices and hosts.

A strategy places the train state and batches on devices and compiles the steps; the train
loop, eval and checkpointing touch device arrays only through its methods:

  init_state(make, *args)  the train state `make(*args)` built in its layout (fsdp: in place,
                        never whole on one device)
  put_state(tree)       host pytree (train state or params) -> device arrays in its layout
  restore_target(abstract)  what orbax restores a checkpoint into, whatever layout saved it
  savable(state)        what orbax saves (fsdp: the sharded arrays, never gathered)
  put_batch(batch)      a host batch of a data.Task ([local devices, ...] numpy) -> step input
  to_host(tree)         device arrays -> host numpy of the one logical value (no device axis);
                        on every process, e.g. for logs and eval-time sampling
  compile(fn, donate=False)
                        a step written for one device's share -> the compiled step on all
                        devices (donate: the first argument's buffers are reused)
  mean(tree), sum(tree) inside a step: over all devices' shares (the global batch)
  constrain(tree)       inside a step: a tree shaped like the state, in the state's layout
  device_index()        inside a step: this device's number (per-device dropout RNG)

Two strategies, chosen by `config.parallel.strategy` (`make`):

- `Pmap` ('pmap'): data parallelism with `jax.pmap` over the local devices (axis 'batch');
  with several processes the same pmapped step spans every device of every host. Every
  device holds the whole state; a replica's batch is [grad_accum, per_device_batch, seq_len].
- `Sharded` ('fsdp'): `jax.jit` over a `Mesh` with axes ('data', 'fsdp', 'expert'). Every
  array of the train state (parameters, gradients, optimizer moments) is placed by one rule
  (`Sharded.spec`, by shape and tree path): an MoE layer's expert stacks ([E, ...] w_gate,
  w_up, w_down, and their moments) have E split over 'expert', and every array one more
  dimension over 'fsdp'. The step sees the global batch [grad_accum, B, seq_len], its rows
  split over all three axes, so `mean`/`sum` are the identity and `device_index` is 0. Steps
  are traced under `jax.set_mesh(mesh)`: there model.MoE pins its [E, C, D] capacity blocks
  to 'expert' (and each expert's rows to the other axes), so each device runs its own
  E / expert experts on its share of their rows and XLA moves the rows between devices
  (all-to-alls). Without an MoE layer 'expert' only splits the batch, like 'data'.

Also here: joining a multi-process run (`initialize`), barriers (`sync`), the
cross-process pre-emption and peer-failure checks, and JAX's persistent compilation cache
(`use_compile_cache`: a later start loads the compiled steps).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from zhgpt_jax.config import UserError, disk_cause

AXIS = 'batch'
MESH_AXES = ('data', 'fsdp', 'expert')
EXPERT_STACKS = ('w_gate', 'w_up', 'w_down')   # an MoE layer's [E, ...] routed expert weights


def is_expert_stack(path) -> bool:
  """True for a key path ending in 'moe' / one of EXPERT_STACKS: an MoE layer's routed
  expert weights, or a gradient or optimizer moment of them (same path tail in optax states)."""
  names = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
  return len(names) >= 2 and names[-2] == 'moe' and names[-1] in EXPERT_STACKS


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


_COMPILE_CACHE = {'dir': None}   # the directory this process pointed JAX's cache at


def use_compile_cache(setting: str, data_dir: str) -> str:
  """Points JAX's persistent compilation cache at `setting` (config.train.compile_cache:
  'auto' = <data_dir>/jax_cache, '' = off, else a directory) and returns the directory ('' when
  off). 'auto' leaves a cache directory set outside zhgpt-jax ($JAX_COMPILATION_CACHE_DIR,
  jax.config) as it is. Every compiled program is stored by a hash of its HLO, the devices
  and the JAX version, so a later start of the same steps loads them from disk instead of
  compiling; a changed model or config compiles anew, and a damaged entry is compiled again
  (JAX warns). JAX runs the code it loads from there: keep it where only you write.
  """
  from jax.experimental.compilation_cache import compilation_cache as cc
  current = jax.config.jax_compilation_cache_dir
  if setting == 'auto' and current and current != _COMPILE_CACHE['dir']:
    return current
  path = os.path.abspath(os.path.join(data_dir, 'jax_cache') if setting == 'auto'
                         else setting) if setting else ''
  try:
    if path:
      os.makedirs(path, exist_ok=True)
      if not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
  except OSError as e:
    if disk_cause(e) is None:
      raise
    if setting != 'auto':   # asked for by name: say so before any work
      raise UserError(f'config.train.compile_cache={setting!r}: cannot write there '
                      f'({disk_cause(e)}); give a writable directory, or \'\' for none') from None
    print(f'warning: the compilation cache {path} is not writable ({disk_cause(e)}); compiling '
          "without it (set config.train.compile_cache to a writable directory)", flush=True)
    path = ''
  if path != (current or ''):
    cc.set_cache_dir(path or None)
    # Store every program, not only those over JAX's default 1 s of compile time: loading
    # a small one costs no more than compiling it, and compile times vary with the load.
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    cc.reset_cache()   # JAX opens its cache once per process; a new directory needs a reset
  _COMPILE_CACHE['dir'] = path or None
  return path


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


def replicate(tree, devices=None):
  """Host pytree -> one copy per device (leading axis = devices; default: every local one)."""
  n = len(devices) if devices else jax.local_device_count()
  return jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)(
      jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree))


def unreplicate(tree):
  """The first local device's copy, as host numpy arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], tree)


# ----------------------------------------------------------------------------- strategies

@dataclasses.dataclass(frozen=True)
class Pmap:
  """Every device holds the whole state; `jax.pmap` over `devices` (default: all local ones)."""
  devices: tuple | None = None
  name = 'pmap'

  @property
  def local_devices(self) -> int:
    return len(self.devices) if self.devices else jax.local_device_count()

  def device_index(self):
    return jax.lax.axis_index(AXIS)

  def mean(self, tree):
    return jax.lax.pmean(tree, AXIS)

  def sum(self, tree):
    return jax.lax.psum(tree, AXIS)

  def constrain(self, tree):
    return tree

  def compile(self, fn: Callable, donate: bool = False) -> Callable:
    return jax.pmap(fn, axis_name=AXIS, devices=self.devices,
                    donate_argnums=(0,) if donate else ())

  def init_state(self, make: Callable, *args):
    """`make(*args)` (host arguments), one copy per device."""
    return self.put_state(make(*args))

  def put_state(self, tree):
    return replicate(tree, self.devices)

  def restore_target(self, abstract):
    # Host arrays: each process reads the whole state, whatever layout saved it.
    return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)

  def savable(self, state):
    return unreplicate(state)

  def put_batch(self, batch: dict) -> dict:
    return batch

  def to_host(self, tree):
    return unreplicate(tree)


@dataclasses.dataclass(frozen=True)
class Sharded:
  """FSDP (+ expert parallelism): `jax.jit` over `mesh`; the state placed by `spec`."""
  mesh: jax.sharding.Mesh
  name = 'fsdp'

  @property
  def local_devices(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)

  def spec(self, shape, path=()) -> PartitionSpec:
    """The one placement rule, for an array of `shape` at tree `path` (a key path, as
    `jax.tree_util.tree_map_with_path` gives; params, gradients and optimizer moments of a
    parameter all end in the parameter's path):

    - an MoE layer's expert stack (`EXPERT_STACKS` under 'moe', [E, ...]) has its E
      dimension split over 'expert' when that axis is larger than 1 (each device holds
      E / expert experts); the 'expert' size must divide E (UserError otherwise);
    - then the largest remaining dimension the 'fsdp' size divides is split over 'fsdp'
      (the first of equals); an array with no such dimension is not split over 'fsdp'.
    """
    axes: list = [None] * len(shape)
    n_exp = self.mesh.shape['expert']
    if n_exp > 1 and is_expert_stack(path):
      if shape[0] % n_exp:
        raise UserError(f'parallel.expert={n_exp} must divide the number of experts '
                        f'model.moe.n_routed={shape[0]} ({jax.tree_util.keystr(tuple(path))})')
      axes[0] = 'expert'
    n = self.mesh.shape['fsdp']
    dims = [i for i, d in enumerate(shape) if n > 1 and d % n == 0 and axes[i] is None]
    if dims:
      axes[max(dims, key=lambda i: (shape[i], -i))] = 'fsdp'
    return PartitionSpec(*axes) if any(axes) else PartitionSpec()

  def shardings(self, tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(self.mesh, self.spec(np.shape(x), path)), tree)

  def device_index(self):
    return 0   # one program for the global batch: the randomness of pmap's device 0

  def mean(self, tree):
    return tree

  def sum(self, tree):
    return tree

  def constrain(self, tree):
    return jax.lax.with_sharding_constraint(tree, self.shardings(tree))

  def compile(self, fn: Callable, donate: bool = False) -> Callable:
    """`jax.jit(fn)`, traced, lowered and run under `jax.set_mesh(self.mesh)`: the model sees
    the mesh (moe.expert_axis_size), so MoE layers place their expert blocks on 'expert'."""
    return _InMesh(jax.jit(fn, donate_argnums=(0,) if donate else ()), self.mesh)

  def init_state(self, make: Callable, *args):
    """`make(*args)` computed in place: no device ever holds the whole state."""
    args = self.put_state(args)
    with jax.set_mesh(self.mesh):
      shardings = self.shardings(jax.eval_shape(make, *args))
    return _InMesh(jax.jit(make, out_shardings=shardings), self.mesh)(*args)

  def put_state(self, tree):
    """Host (or differently placed) arrays -> this layout; each device copies its slice."""
    def put(x, sharding):
      if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)   # a no-op where it already is in place
      x = np.asarray(x)   # the same on every process; each takes its devices' slices
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree, self.shardings(tree))

  def restore_target(self, abstract):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, self.shardings(abstract))

  def savable(self, state):
    return state   # orbax writes each process's own shards; nothing is gathered

  def batch_spec(self, ndim: int) -> PartitionSpec:
    """[..., B, T]: rows split over every mesh axis."""
    return PartitionSpec(*([None] * (ndim - 2)), MESH_AXES, None)

  def put_batch(self, batch: dict) -> dict:
    """[local devices, ..., B, T] per process -> one global [..., B_global, T] array each.

    Each process's rows go to its own devices (`make_array_from_process_local_data`), so
    several hosts build the global batch the same way one does.
    """
    def put(x):
      x = np.asarray(x)
      rows = np.moveaxis(x, 0, -3)
      rows = rows.reshape(*rows.shape[:-3], rows.shape[-3] * rows.shape[-2], rows.shape[-1])
      sharding = NamedSharding(self.mesh, self.batch_spec(rows.ndim))
      return jax.make_array_from_process_local_data(sharding, rows)
    return {k: put(v) for k, v in batch.items()}

  def to_host(self, tree):
    """Whole arrays as host numpy; a collective (every process must call) for split ones."""
    def get(x):
      if x.is_fully_addressable:
        return np.asarray(x)
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(get, tree)


@dataclasses.dataclass(frozen=True)
class _InMesh:
  """A jitted function whose calls and `lower` run under `jax.set_mesh(mesh)`."""
  jitted: Any
  mesh: jax.sharding.Mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


Strategy = Any   # Pmap | Sharded


def mesh_shape(parallel_cfg, n_devices: int) -> tuple[int, ...]:
  """(data, fsdp, expert) sizes for `n_devices`: one size may be -1, the rest of the devices.

  Raises UserError (one line naming the keys) when the sizes cannot cover the devices.
  """
  sizes = [parallel_cfg[a] for a in MESH_AXES]
  named = ' x '.join(f'parallel.{a}={s}' for a, s in zip(MESH_AXES, sizes))
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) == 1:
    if n_devices % known:
      raise UserError(f'{named}: {n_devices} devices are not a multiple of {known}')
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise UserError(f'{named} = {math.prod(sizes)} devices, but this run has {n_devices}; '
                    'set one of them to -1 (the rest)')
  return tuple(sizes)


def make(parallel_cfg) -> Strategy:
  """The strategy config.parallel asks for, over every device of every process."""
  if parallel_cfg is None or parallel_cfg.strategy == 'pmap':
    return Pmap()
  shape = mesh_shape(parallel_cfg, jax.device_count())
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Sharded(jax.make_mesh(shape, MESH_AXES, axis_types=axis_types))


def scalar(x) -> float:
  """A scalar the step computed, read on this process without communication: every device
  holds it (pmap: one copy per device; fsdp: replicated)."""
  return float(np.asarray(x.addressable_data(0)).reshape(-1)[0])


def bytes_per_device(tree) -> int:
  """The most bytes of `tree` that any one device holds (summed over addressable shards)."""
  held: dict = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
  return max(held.values(), default=0)


def describe(strategy: Strategy, state) -> str:
  """One line: the strategy, its devices and the train state's bytes per device."""
  whole = sum(x.nbytes for x in jax.tree.leaves(state))
  if strategy.name == 'pmap':
    whole //= strategy.local_devices   # [local devices, ...]: one copy each
    where = f'pmap over {jax.device_count()} devices, the whole state on each'
  else:
    where = 'fsdp mesh ' + ' x '.join(f'{a}={n}' for a, n in strategy.mesh.shape.items())
  return (f'parallel: {where}; train state {bytes_per_device(state) / 2**20:,.1f} MiB per '
          f'device ({whole / 2**20:,.1f} MiB for one copy)')


@jax.jit
def _all_finite(tree):
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all()
                                        for x in jax.tree.leaves(tree)]))


def all_finite(tree) -> bool:
  """True when every element of every array in `tree` is finite (reduced where it lives)."""
  return bool(np.asarray(_all_finite(tree).addressable_data(0)))


def sync(name: str) -> None:
  """A barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
