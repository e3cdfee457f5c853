"""Experiment: native convs + `fast_ops.conv_transpose` (einsum + reshape) for the k == s upsampling.

On an H100 the native strided transposed conv lowers to slow pure-fp32 / bf16 cuDNN fprop kernels
with layout transposes (benchmarks/profile_step.py); this patches `layers.conv_transpose` for
the run and prints `unet_ds.bench`'s JSON line, to compare with the plain native run.

  python benchmarks/hybrid_bench.py --config=configs/unet3d.py:bench_ref [bench flags]
"""

from absl import app

from unet_ds import bench
from unet_ds.models import fast_ops
from unet_ds.models import layers

_native_conv_transpose = layers.conv_transpose


def _hybrid_conv_transpose(x, kernel, strides, impl):
  if tuple(kernel.shape[:-2]) == tuple(strides):
    return fast_ops.conv_transpose(x, kernel, strides=tuple(strides))
  return _native_conv_transpose(x, kernel, strides, impl)


if __name__ == '__main__':
  layers.conv_transpose = _hybrid_conv_transpose
  app.run(bench.main)
