"""The Kaggle TGS salt U-Net ("U-Net with simple ResNet blocks" + hypercolumn) as a preset:
binary segmentation, one sigmoid channel, BCE + Dice, Adam.

  python -m unet_ds.main --config=configs/tgs_salt.py --workdir=runs/tgs            # synthetic
  python -m unet_ds.main --config=configs/tgs_salt.py:path=/data/isbi/train,isbi \
      --workdir=runs/tgs_em                                      # ISBI 2012 EM membranes
  python -m unet_ds.main --config=configs/tgs_salt.py:path=/data/tgs/train --workdir=runs/tgs

The model, as the Keras kernel builds it:
- 2D, `start_neurons` 16 (widths 16-32-64-128-256), four poolings (depth 5), max pooling;
- every level: a 3x3 conv (bias, no activation), then two pre-activation residual units
  (BN-ReLU-conv-BN-ReLU-conv + identity skip), the second ending in BN-ReLU
  (`model.block='preact_residual'`, `convs_per_block` = units per level);
- dropout 0.25 after the first pool, 0.5 after the others and on every decoder concatenation
  (`model.down_dropout=(0.25, 0.5)`, the last rate repeating; `model.up_dropout=0.5`);
- 3x3 stride-2 transposed convs with 'same' padding for upsampling (`model.up_kernel=3`);
- hypercolumn: every decoder level resized to full size and concatenated -> dropout 0.5 ->
  3x3 conv + ReLU (bias, no norm) -> 1x1 -> sigmoid (`ds.mode='hypercolumn'`,
  `ds.fusion='conv_act'`, `ds.fusion_dropout=0.5`; the sigmoid is inside the loss / metrics);
- `loss.name='bce_dice'` on `model.num_classes=1`, Adam (`optim.weight_decay=0`).
Metrics: foreground Dice and IoU at p > 0.5, per head too, and the competition score
(`metrics.tgs_scores`: per image, precision averaged over IoU thresholds 0.50:0.05:0.95, an
empty label scoring 1 only for an empty prediction).

What still differs from the original, and why:
- Hypercolumn levels are resized with linear interpolation, not nearest UpSampling2D (the one
  resize of `ds.hypercolumn`, shared by every model here).
- Batch-norm momentum 0.9 (flax convention in `blocks.Norm`) vs Keras 0.99; epsilon 1e-5 vs 1e-3.
- Kernels are He-normal (`layers`), Keras used Glorot-uniform.
- Loss: the kernel's later stages switched to the Lovasz hinge; here BCE + soft Dice (batch
  Dice, the README's `bce_dice`), the seed's loss.
- Inputs: TGS images were 101x101 padded/resized to 128x128; here any folder of images, trained
  on random patches (`data.patch_size`, default 128x128 on real data, 64x64 synthetic) with the
  project's augmentation, and predicted by sliding window.
- Optimiser: Adam with the project's warm-up + cosine schedule, not ReduceLROnPlateau on
  validation IoU; no early stopping (fixed `train.steps`).
- The per-level 1x1 heads of `hypercolumn` exist (for optional side losses,
  `loss.side_losses=True`) but are not trained by default, as in the original.

Args (comma-separated): path=DIR, isbi (ISBI masks: 0 = membrane = foreground, 255 = cell;
slices 25-29 held out, whole 512x512 eval), dropout_ratio=R (the kernel's DropoutRatio, 0.5:
R/2 after the first pool, R after the others, on the decoder concatenations and the
hypercolumn), patch=HxW, steps=N, classes=K, channels=C, fold=N,
seed=N, smoke. With `classes=K` > 2 the one channel is the union of the foreground classes.
"""

from unet_ds import presets


def _settings(c, real):
  c.data.num_classes = 2                 # label values; the model has one sigmoid channel
  c.model.num_classes = 1
  c.model.update(depth=5, base_filters=16, filter_growth=2, block='preact_residual',
                 convs_per_block=2, residual=False, norm='batch', activation='relu',
                 down='maxpool', up='transpose', up_kernel=3, dropout=0.0,
                 down_dropout=(0.25, 0.5), up_dropout=(0.5,))
  c.model.ds.mode = 'hypercolumn'
  c.model.ds.levels = ()
  c.model.ds.fusion = 'conv_act'
  c.model.ds.fusion_dropout = 0.5
  c.loss.name = 'bce_dice'
  c.loss.side_losses = False
  c.loss.ds_weights = 'exp'
  c.optim.update(name='adamw', lr=1e-3, weight_decay=0.0, schedule='cosine', warmup_steps=20)
  c.inference.tta_axes = (1,)            # the kernel's prediction: mean with the left-right flip
  if real:
    # Sized for a few CPU cores: ISBI membranes, see docs/results.md.
    c.data.patch_size = c.data.shape = c.data.eval_shape = (128, 128)
    c.train.update(steps=300, batch_size=4, eval_batch_size=2, eval_every=100,
                   checkpoint_every=100)
  else:
    c.data.shape = (64, 64)
    c.data.num_train, c.data.num_val = 256, 32
    c.train.update(steps=300, batch_size=8, eval_batch_size=16, eval_every=100,
                   checkpoint_every=100)


def _isbi(c, _):
  c.data.label_map = '0:1,255:0'         # ISBI masks: 0 = membrane (foreground), 255 = cell
  c.data.val_cases = '25,26,27,28,29'    # adjacent slices correlate: hold out a block
  c.data.eval_shape = (512, 512)


def _dropout_ratio(c, value):
  """The kernel's `DropoutRatio` (0.5): half of it after the first pool, all of it elsewhere."""
  r = float(value)
  c.model.down_dropout, c.model.up_dropout = (r / 2, r), (r,)
  c.model.ds.fusion_dropout = r


def _no_bench_ref(c, _):
  raise ValueError('unknown config argument \'bench_ref\' for configs/tgs_salt.py: the speed '
                   'reference is a softmax 3D model (configs/unet3d.py:bench_ref)')


def get_config(arg=None):
  return presets.build(arg, ndim=2, settings=_settings,
                       extra={'isbi': _isbi, 'dropout_ratio': _dropout_ratio,
                              'bench_ref': _no_bench_ref})
