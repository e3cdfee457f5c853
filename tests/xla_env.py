"""XLA settings for every process the tests run (imported by conftest before jax starts).

LLVM at -O0: the tests' programs are small and run a few steps, so compiling, not running,
dominates their time; -O0 compiles several times faster. Benchmarks and users keep XLA's -O2.
"""

FAST_COMPILE = '--xla_backend_optimization_level=0'


def flags(devices: int | None = None) -> str:
  """`XLA_FLAGS` for a test process: fast compiles, and `devices` simulated CPU devices."""
  extra = f' --xla_force_host_platform_device_count={devices}' if devices else ''
  return FAST_COMPILE + extra
