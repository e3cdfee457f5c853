"""The train state: its structure, its construction from a config, and its restore from a workdir.

One home for what train, predict, bench and multirun all need: `TrainState`, `create` (pure, from a
seed), `Setup.from_config` (model + optimiser + lr schedule of a config), `abstract` (shapes and
shardings without compute) and `restore` (the latest readable checkpoint of a workdir, including a
member run of a multi-run workdir, whose state is stacked in its parent's checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unet_ds import checkpoint
from unet_ds import config_lib
from unet_ds import dirnames
from unet_ds import models
from unet_ds import optim

CHECKPOINT_DIR = 'checkpoints'
MULTIRUN_FILE = dirnames.MULTIRUN_FILE


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key: checkpoints as a plain array

  def variables(self) -> dict[str, Any]:
    v = {'params': self.params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v


def create(model: nn.Module, tx: optax.GradientTransformation, seed: Any,
           input_shape: tuple[int, ...]) -> TrainState:
  """Initial state from `seed` (pure; jit it with a replicated out-sharding)."""
  # Parameters are drawn with the RngBitGenerator PRNG: XLA:CPU compiles a U-Net's init ~8x
  # faster than with threefry.
  init_rng = jax.random.key(seed, impl='rbg')
  state_rng = jax.random.PRNGKey(seed)  # dropout stream
  variables = model.init(init_rng, jnp.zeros(input_shape, jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                    rng=state_rng)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a state is built with: the model, its optimiser and learning-rate schedule."""
  model: nn.Module
  model_config: models.UNetConfig
  tx: optax.GradientTransformation
  lr: optax.Schedule

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Setup':
    model_cfg = config_lib.validate(config)
    tx, lr = optim.make_optimizer(config.optim, int(config.train.steps))
    return cls(model=models.get_model(model_cfg), model_config=model_cfg, tx=tx, lr=lr)


def abstract(setup: Setup, input_shape: tuple[int, ...], sharding: jax.sharding.Sharding,
             num_runs: int = 0) -> TrainState:
  """The state's shapes and dtypes with `sharding` (no compute); stacked `[K, ...]` if `num_runs`."""
  shapes = jax.eval_shape(lambda: create(setup.model, setup.tx, 0, input_shape))
  if num_runs:
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct((num_runs, *s.shape), s.dtype), shapes)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def num_params(params: Any, stacked: bool = False) -> int:
  """Parameter count (of one run when `stacked`)."""
  return int(sum(p[0].size if stacked else p.size for p in jax.tree.leaves(params)))


def multirun_parent(workdir: str) -> tuple[str, int, int] | None:
  """`(parent workdir, run index, number of runs)` when `workdir` is a member run of a multi-run workdir."""
  parent = os.path.dirname(os.path.abspath(workdir))
  path = os.path.join(parent, MULTIRUN_FILE)
  if os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)) or not os.path.exists(path):
    return None
  with open(path) as f:
    names = json.load(f)['runs']
  name = os.path.basename(os.path.abspath(workdir))
  return (parent, names.index(name), len(names)) if name in names else None


def restore(config: ml_collections.ConfigDict, workdir: str,
            sharding: jax.sharding.Sharding | None = None) -> tuple[Setup, TrainState, int]:
  """(setup, state, step) of `workdir`'s latest readable checkpoint, built with `config`.

  A member run of a multi-run workdir (`WORKDIR/<run>/`, no checkpoints of its own) is sliced
  out of its parent's stacked checkpoint. Needs the checkpoint and the config, not the data.
  """
  setup = Setup.from_config(config)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  patch = tuple(config.data.get('patch_size') or config.data.shape)
  input_shape = (1, *patch, int(config.data.in_channels))
  member = multirun_parent(workdir)
  ckpt_root, num_runs = (member[0], member[2]) if member else (workdir, 0)
  directory = os.path.join(os.path.abspath(ckpt_root), CHECKPOINT_DIR)
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise FileNotFoundError(f'no checkpoints in {directory}: train first (--mode=train)')
  ckpts = checkpoint.Checkpoints(directory, int(config.train.max_to_keep))
  try:
    state, _, step = ckpts.restore(abstract(setup, input_shape, sharding, num_runs))
  finally:
    ckpts.close()
  if member:
    state = jax.tree.map(lambda x: x[member[1]], state)
  return setup, state, int(step)
