#!/usr/bin/env bash
# Runs `unet_ds.bench` over the reference config's variants, one JSON line each, to $1 (a file).
#   benchmarks/bench_suite.sh OUT.jsonl [SIZES] [DTYPES] [EXTRA FLAGS...]
# e.g. benchmarks/bench_suite.sh /tmp/gpu.jsonl "64 128" "float32 bfloat16" --steps=10
set -u
out=${1:?output file}; sizes=${2:-64}; dtypes=${3:-float32}; shift 3 || shift $#
py=${PYTHON:-python3}
for size in $sizes; do
  for dtype in $dtypes; do
    for remat in False True; do
      [ "$remat" = True ] && [ "$size" = 64 ] && continue  # remat only where memory matters
      echo "== size=$size dtype=$dtype remat=$remat" >&2
      $py -m unet_ds.bench --config=configs/unet3d.py:bench_ref \
        --config.data.shape="($size,$size,$size)" --config.model.dtype="$dtype" \
        --config.model.remat="$remat" "$@" | tail -n 1 >> "$out"
    done
  done
done
