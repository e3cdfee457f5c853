"""Shared pytest setup: simulated CPU devices for sharding tests, quiet logs."""
import os

# Must be set before jax is imported anywhere: 4 simulated CPU devices for the sharding tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
