"""Experiment: `unet_ds.bench` with ops the model does not route through `layers` yet.

  python benchmarks/hybrid_bench.py --patch=conv_transpose,max_pool [bench flags]

- conv_transpose: native convs + `fast_ops.conv_transpose` (einsum + reshape) for the k == s
  upsampling, on any backend. On an H100 the native strided transposed conv lowers to slow
  pure-fp32 / bf16 cuDNN kernels with layout transposes (benchmarks/profile_step.py).
- max_pool: `fast_ops.max_pool` instead of `nn.max_pool` in the U-Net (XLA:CPU expands the
  native gradient into whole-volume index arrays).
Prints bench's JSON line, to compare with a plain run under the same conditions.
"""

from absl import app
from absl import flags
import flax.linen as nn

from unet_ds import bench
from unet_ds.models import fast_ops
from unet_ds.models import layers
from unet_ds.models import unet

_PATCH = flags.DEFINE_list('patch', ['conv_transpose'], 'conv_transpose, max_pool')

_native_conv_transpose = layers.conv_transpose


def _hybrid_conv_transpose(x, kernel, strides, impl):
  if tuple(kernel.shape[:-2]) == tuple(strides):
    return fast_ops.conv_transpose(x, kernel, strides=tuple(strides))
  return _native_conv_transpose(x, kernel, strides, impl)


class _PooledNN:
  """`flax.linen` with `max_pool` replaced, as seen from `unet.py`."""

  def __getattr__(self, name):
    return getattr(nn, name)

  @staticmethod
  def max_pool(x, window_shape, strides=None, padding='VALID'):
    if strides is not None and tuple(strides) != tuple(window_shape) or padding != 'VALID':
      return nn.max_pool(x, window_shape, strides=strides, padding=padding)
    return fast_ops.max_pool(x, window_shape)


def main(argv):
  unknown = set(_PATCH.value) - {'conv_transpose', 'max_pool'}
  if unknown:
    raise app.UsageError(f'unknown --patch {sorted(unknown)}')
  if 'conv_transpose' in _PATCH.value:
    layers.conv_transpose = _hybrid_conv_transpose
  if 'max_pool' in _PATCH.value:
    unet.nn = _PooledNN()
  bench.main(argv)


if __name__ == '__main__':
  app.run(main)
