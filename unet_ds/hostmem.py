"""Host memory of the process: its peak resident set, and handing freed heap back to the OS.

XLA's compiler allocates a few hundred MB while it compiles a U-Net step and frees them, but
glibc keeps freed pages of its heap mapped (they count in RSS, and under the step's peak, which
comes on top). `trim_host_heap()` after compiling returns them (3D bench_ref: 720 -> 465 MB
before the first step). `benchmarks/host_memory.py` shows where a step's peak goes, by stage.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource


def peak_rss_mb() -> float:
  """The process's peak resident set size so far (MiB): what the host had to hold at once."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def _malloc_trim():
  name = ctypes.util.find_library('c')
  try:
    return ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):  # not glibc
    return None


def trim_host_heap() -> bool:
  """Returns the heap's free pages to the OS (glibc `malloc_trim`); False where unavailable.

  Collects Python's cyclic garbage first: tracing and compiling leave cycles that hold traced
  computations and executables (3D bench_ref: ~30 MB more returned after the step's compile).
  """
  gc.collect()
  trim = _malloc_trim()
  if trim is None:
    return False
  trim(0)
  return True
