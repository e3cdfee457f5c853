"""MONAI DynUNet train step and inference on the shapes of `configs/unet{2,3}d.py:bench_ref`.

An optional side-by-side for `python -m unet_ds.bench`: torch and monai are not project
dependencies; install them in a separate venv (see README, "Speed"):

  python3 -m venv /work/monai_venv && /work/monai_venv/bin/pip install torch monai
  /work/monai_venv/bin/python benchmarks/monai_dynunet.py [--dims=3] [--steps=10]

Reference models: 1 input channel, 3 classes, residual blocks, instance norm, stride-2 conv
downsampling, 3x3(x3) kernels, k2/s2 transposed-conv upsampling, deep supervision (MONAI's
`DeepSupervisionLoss` around `DiceCELoss`), SGD Nesterov (momentum 0.99).
3D: 4 levels 16-32-64-128, 2 heads, batch 2 x 64^3. 2D: 5 levels 32-64-128-256-512, 3 heads,
batch 8 x 256^2. Prints one JSON line with the same step-time and memory keys as `unet_ds.bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
from monai import losses
from monai.networks import nets


# dims -> (filters, deep supervision heads, batch, size): the bench_ref configs' shapes.
REFERENCES = {3: ((16, 32, 64, 128), 2, 2, 64), 2: ((32, 64, 128, 256, 512), 3, 8, 256)}


def build(dims: int = 3, num_classes: int = 3, filters=(16, 32, 64, 128), deep_supr_num: int = 2):
  model = nets.DynUNet(
      spatial_dims=dims, in_channels=1, out_channels=num_classes,
      kernel_size=[3] * len(filters), strides=[1] + [2] * (len(filters) - 1),
      upsample_kernel_size=[2] * (len(filters) - 1), filters=list(filters),
      norm_name='instance', res_block=True, deep_supervision=True,
      deep_supr_num=deep_supr_num)
  loss = losses.DeepSupervisionLoss(
      losses.DiceCELoss(to_onehot_y=True, softmax=True), weight_mode='exp')
  opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True,
                        weight_decay=1e-4)
  return model, loss, opt


def _stats(seconds, prefix):
  return {f'{prefix}_median': statistics.median(seconds), f'{prefix}_min': min(seconds),
          f'{prefix}_max': max(seconds)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--dims', type=int, default=3, choices=(2, 3))
  parser.add_argument('--size', type=int, default=0, help='0: the reference size of --dims')
  parser.add_argument('--batch', type=int, default=0, help='0: the reference batch of --dims')
  parser.add_argument('--threads', type=int, default=0, help='torch threads; 0: default')
  parser.add_argument('--device', default='cpu')
  args = parser.parse_args()
  baseline_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # after imports
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  device = torch.device(args.device)
  filters, heads, batch, size = REFERENCES[args.dims]
  args.batch, args.size = args.batch or batch, args.size or size
  model, loss_fn, opt = build(args.dims, filters=filters, deep_supr_num=heads)
  model.to(device)
  shape = (args.batch, 1) + (args.size,) * args.dims
  image = torch.randn(shape, device=device)
  label = torch.randint(0, 3, shape, device=device)

  def sync():
    if device.type == 'cuda':
      torch.cuda.synchronize()

  def train_step():
    opt.zero_grad(set_to_none=True)
    out = model(image)  # [B, 1 + deep_supr_num, C, *spatial] in training mode
    loss = loss_fn(torch.unbind(out, dim=1), label)
    loss.backward()
    opt.step()
    return loss

  model.train()
  times, cpu_times = [], []
  for i in range(args.warmup + args.steps):
    sync()
    t, c = time.perf_counter(), time.process_time()
    train_step()
    sync()
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
      cpu_times.append(time.process_time() - c)
  record = {'framework': 'monai', 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'device': str(device), 'batch_size': args.batch, 'shape': [args.size] * args.dims,
            'timed_steps': args.steps}
  record.update(_stats(times, 'step_s'))
  record['step_cpu_s_median'] = statistics.median(cpu_times)
  record['voxels_per_s'] = args.batch * args.size ** args.dims / record['step_s_median']
  record['train_peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  model.eval()
  times = []
  with torch.inference_mode():
    for i in range(args.warmup + args.steps):
      sync()
      t = time.perf_counter()
      model(image)
      sync()
      if i >= args.warmup:
        times.append(time.perf_counter() - t)
  record.update(_stats(times, 'infer_s'))
  record['load_avg_1min'] = os.getloadavg()[0]
  record['baseline_rss_mb'] = baseline_rss_mb
  record['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  record['params'] = sum(p.numel() for p in model.parameters())
  print(json.dumps(record))


if __name__ == '__main__':
  main()
