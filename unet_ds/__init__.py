"""unet_ds: 2D/3D U-Nets with deep supervision in JAX/Flax."""
