"""XLA:CPU flags the CPU paths are tuned for, set by an explicit call from entry points.

XLA:CPU (jax 0.10) hands some 2D convolutions to YNNPACK, which runs them on one thread and 2-3x
slower than its Eigen path (64^3 x 32 -> 48 channels: 243 ms vs 75 ms on 2 cores); keeping
YNNPACK for dots and reductions only made the 3D bench_ref train step ~13% faster.

XLA reads `XLA_FLAGS` when its CPU backend starts, so `configure_xla_flags()` must run before
the first jax computation of the process (importing jax is fine). Command-line entry points call
it first thing in `main`; library users call it themselves.
"""

from __future__ import annotations

import os

XLA_CPU_FLAGS = {
    'xla_cpu_experimental_ynn_fusion_type':
        'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE',
}


def configure_xla_flags() -> str:
  """Appends `XLA_CPU_FLAGS` to `$XLA_FLAGS`, except flags the user already set; returns it."""
  flags = os.environ.get('XLA_FLAGS', '')
  extra = [f'--{name}={value}' for name, value in XLA_CPU_FLAGS.items() if name not in flags]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([flags] + extra).strip()
  return os.environ.get('XLA_FLAGS', '')
