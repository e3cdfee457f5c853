"""Spatial ops of the U-Nets and their backend implementations, chosen by `model.conv_impl`.

- `dispatch`: the impl names, 'auto' resolution, and the conv / transposed conv / pool / resize
  the layers call, routed to one of the modules below.
- `xla_cpu`: convolutions rewritten from the fast pieces of XLA:CPU (2D convs, matmuls).
- `fused`: instance norm + activation as one op, and a max pool with a one-pass gradient; both
  CPU paths (`cpu_fast`, `onednn`) use them.
- `upsampling`: transposed convolutions in the sub-pixel form (kernel == stride: one einsum and a
  reshape, the GPU/TPU default `native_einsum_up`).
- `onednn`: oneDNN convolutions as XLA custom calls (C++ shim `onednn_conv.cc`, built on first
  use), the single-device CPU default.
- `xla_flags`: `configure_xla_flags()`, which entry points call before any jax computation.

Kernels are in flax layout (*k, C_in, C_out), activations channels-last, everywhere.
"""

from unet_ds.models.ops.xla_flags import configure_xla_flags
from unet_ds.models.ops.xla_flags import XLA_CPU_FLAGS

__all__ = ['configure_xla_flags', 'XLA_CPU_FLAGS']
