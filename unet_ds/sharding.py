"""Device mesh and shardings: batch over `data`, optionally the first spatial axis over `space`.

The train step is written once against a `Mesh('data', 'space')`; on one device both axes have
size 1 and the same code runs unchanged. Parameters and optimiser state are replicated.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


_DISTRIBUTED_KEYS = ('coordinator_address', 'num_processes', 'process_id')


def maybe_initialize_distributed(mesh_cfg: Any) -> bool:
  """Multi-host: `jax.distributed.initialize()` when `mesh.distributed` is set.

  Must run before anything touches a JAX backend (so it checks `jax.distributed.is_initialized`,
  not `jax.process_count`, which would start the backend). The coordinator, process count and id
  come from `mesh.coordinator_address` / `mesh.num_processes` / `mesh.process_id` where set, else
  from JAX_COORDINATOR_ADDRESS etc. or JAX's cluster auto-detection (SLURM, Open MPI, TPU pods,
  ...). On CPU, cross-process collectives use gloo. Returns whether the job is multi-process.
  """
  if not mesh_cfg.get('distributed', False):
    return False
  if not jax.distributed.is_initialized():
    kwargs = {key: mesh_cfg.get(key) for key in _DISTRIBUTED_KEYS
              if mesh_cfg.get(key) not in (None, '', -1)}
    jax.distributed.initialize(**kwargs)
  return True


def select_devices(devices: Sequence[Any], data: int, space: int) -> list[Any]:
  """The `data * space` devices of a mesh, in mesh order (row-major over data x space).

  One process: the first ones. Several: the same number from each process, its lowest ids first,
  ordered by process, so every process holds whole rows of the data axis: each feeds its own
  rows of the batch (`shard_batch`), even when the mesh is smaller than all devices.
  """
  need = data * space
  if data < 1 or space < 1 or need > len(devices):
    raise ValueError(f'config.mesh: data={data} x space={space} needs {need} devices, '
                     f'{len(devices)} available')
  by_process: dict[int, list[Any]] = {}
  for d in sorted(devices, key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  if len(by_process) == 1:
    return list(devices[:need])
  n = len(by_process)
  if data % n:
    raise ValueError(f'config.mesh.data={data} must be a multiple of the {n} processes: each '
                     'process feeds its own rows of the batch, so holds whole rows of the data '
                     'axis')
  per = need // n
  for process, local in by_process.items():
    if len(local) < per:
      raise ValueError(f'config.mesh: data={data} x space={space} takes {per} devices from each '
                       f'of the {n} processes, but process {process} has {len(local)}')
  return [d for local in by_process.values() for d in local[:per]]


def make_mesh(mesh_cfg: Any) -> Mesh:
  """A ('data', 'space') mesh; `data=-1` uses every device not used by `space`.

  Devices are picked by `select_devices` (an equal share of every process's devices).
  """
  devices = jax.devices()
  space = int(mesh_cfg.get('space', 1) or 1)
  data = int(mesh_cfg.get('data', -1))
  if data <= 0:
    data = len(devices) // space
  picked = select_devices(devices, data, space)
  return Mesh(np.asarray(picked).reshape(data, space), ('data', 'space'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_spec(ndim: int, spatial: bool = True) -> P:
  """PartitionSpec of a `[B, *spatial(, C)]` array with `ndim` dims."""
  if not spatial or ndim < 2:
    return P('data')
  return P('data', 'space', *([None] * (ndim - 2)))


def shard_batch(mesh: Mesh, batch: dict[str, Any]) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays (each process holds its own rows)."""
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    sharding = NamedSharding(mesh, batch_spec(value.ndim, spatial=value.ndim > 1))
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def check_batch_size(mesh: Mesh, batch_size: int, what: str) -> None:
  data = mesh.shape['data']
  if batch_size % data:
    raise ValueError(f'config.train.{what}={batch_size} must be divisible by the {data} devices '
                     "of the mesh's data axis")
