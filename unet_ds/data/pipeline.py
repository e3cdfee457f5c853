"""grain input pipelines: an infinite, shuffled, resumable train loader and exact one-pass eval batches.

A source is any random-access sequence of examples (`len(source)`, `source[i]`), e.g. what
`unet_ds.data.synthetic.load` returns. Batches are dicts of numpy arrays with a leading batch dim.

Multi-host: pass `shard_index=jax.process_index()`, `shard_count=jax.process_count()`; `batch_size` is
then the per-process batch. Train shards are disjoint and equal-sized (the remainder is dropped); eval
shards are contiguous and every shard yields the same number of batches (padding is masked out), so all
processes run the same number of eval steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import flags
import grain.python as grain
import numpy as np

# Raw records read ahead per batch; small because a record may be a whole volume.
_PREFETCH_BATCHES = 2
_READ_THREADS = 2


def _check_sharding(num_records: int, batch_size: int, shard_index: int, shard_count: int) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'pipeline: batch_size must be a positive int, got {batch_size!r}')
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f'pipeline: need 0 <= shard_index < shard_count, got shard_index={shard_index}, '
                     f'shard_count={shard_count}')
  if num_records < 1:
    raise ValueError('pipeline: the source is empty')


def make_train_loader(source: Sequence[Any], *, batch_size: int, seed: int, shard_index: int = 0,
                      shard_count: int = 1, transforms: Sequence[grain.Transformation] = (),
                      batch_fn: Callable[[Sequence[Any]], Any] | None = None,
                      worker_count: int = 0) -> grain.DataLoader:
  """An infinite loader of shuffled batches, reshuffled every epoch, deterministic given `seed`.

  Args:
    source: random-access examples.
    batch_size: examples per batch on this process (the last partial batch of an epoch does not exist:
      batches run on across epochs).
    seed: shuffling seed and base of the per-example rng handed to `RandomMapTransform`s; 0 <= seed < 2**32.
    shard_index: this process's shard, e.g. `jax.process_index()`.
    shard_count: number of shards, e.g. `jax.process_count()`.
    transforms: grain `MapTransform`/`RandomMapTransform`s applied per example before batching.
    batch_fn: turns the list of a batch's examples into the batch (default: stack each key); it
      sees each example's place in the batch (e.g. `patches.PatchBatch`).
    worker_count: grain worker processes (0: in this process). Each worker batches its own share of the
      records, so the batch order depends on it; a saved state restores only with the same worker_count.
      Transforms must then be picklable (defined at module level).

  Returns:
    A `grain.DataLoader`; `it = iter(loader)` yields batches, `it.get_state()` / `it.set_state(state)`
    (bytes) save and restore the position exactly.
  """
  _check_sharding(len(source), batch_size, shard_index, shard_count)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f'pipeline: seed must be an int in [0, 2**32), got {seed!r}')
  if len(source) < shard_count:
    raise ValueError(f'pipeline: {len(source)} training examples cannot fill {shard_count} shards')
  if worker_count < 0:
    raise ValueError(f'pipeline: worker_count must be >= 0, got {worker_count}')
  for t in transforms:
    if not isinstance(t, (grain.MapTransform, grain.RandomMapTransform)):
      raise TypeError(f'pipeline: transforms must be grain MapTransform/RandomMapTransform, got {t!r}')
  if worker_count > 0 and not flags.FLAGS.is_parsed():
    # grain's worker processes read absl flags; outside absl.app.run nothing has parsed them.
    flags.FLAGS.mark_as_parsed()
  shard_options = grain.ShardOptions(shard_index=int(shard_index), shard_count=int(shard_count),
                                     drop_remainder=True)
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard_options, shuffle=True,
                               num_epochs=None, seed=int(seed))
  return grain.DataLoader(
      data_source=source,
      sampler=sampler,
      operations=[*transforms, grain.Batch(batch_size=int(batch_size), drop_remainder=True,
                                             batch_fn=batch_fn)],
      worker_count=worker_count,
      shard_options=shard_options,
      read_options=grain.ReadOptions(num_threads=_READ_THREADS,
                                     prefetch_buffer_size=_PREFETCH_BATCHES * int(batch_size)),
  )


def eval_shard_bounds(num_records: int, shard_index: int, shard_count: int) -> tuple[int, int]:
  """This shard's contiguous `[start, end)` of the eval set; shard sizes differ by at most one."""
  per_shard, remainder = divmod(num_records, shard_count)
  start = shard_index * per_shard + min(shard_index, remainder)
  return start, start + per_shard + (shard_index < remainder)


def make_eval_batches(source: Sequence[Any], *, batch_size: int, shard_index: int = 0,
                      shard_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over this shard of `source` in batches of exactly `batch_size`.

  Each batch has the source's keys plus `'mask'`: bool [B], True for real examples. The last batch is
  padded with zero examples, and every shard yields `ceil(ceil(len(source) / shard_count) / batch_size)`
  batches (a shard with fewer examples adds fully masked batches), so metrics summed over masked
  examples of all shards are exact over the whole set.
  """
  num_records = len(source)
  _check_sharding(num_records, batch_size, shard_index, shard_count)
  start, end = eval_shard_bounds(num_records, shard_index, shard_count)
  num_batches = -(-(-(-num_records // shard_count)) // batch_size)
  padded = num_batches * batch_size
  blank = None

  def _example(i: int) -> dict[str, Any]:
    nonlocal blank
    if start + i < end:
      return {**source[start + i], 'mask': np.True_}
    if blank is None:
      blank = {k: np.zeros_like(v) for k, v in source[0].items()}
    return {**blank, 'mask': np.False_}

  dataset = (grain.MapDataset.range(padded).map(_example).batch(batch_size)
             .to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                                prefetch_buffer_size=_PREFETCH_BATCHES * batch_size)))
  return iter(dataset)
