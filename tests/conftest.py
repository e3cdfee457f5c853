"""Shared pytest setup: simulated CPU devices for sharding tests, quiet logs."""
import os

from tests import xla_env  # noqa: E402  (no jax import)

# Must be set before jax is imported anywhere: 4 simulated CPU devices for the sharding tests,
# fast compiles (`xla_env`); subprocesses inherit it.
os.environ.setdefault("XLA_FLAGS", xla_env.flags(devices=4))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# One compilation cache for the whole session, its xdist workers included (they inherit the
# variable): tests that rebuild the same program (resume, restore, eval) reuse the compiled
# executable instead of paying XLA again. The process that made it removes it when it exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="unet_ds_jax_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One synthetic-data dir for the session (generated once per parameter set)."""
  return str(tmp_path_factory.mktemp("tfds"))
