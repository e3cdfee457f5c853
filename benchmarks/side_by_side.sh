#!/usr/bin/env bash
# Ours (`unet_ds.bench`, bench_ref) and MONAI DynUNet (benchmarks/monai_dynunet.py), alternated
# ROUNDS times under the same environment (allocator, threads), one JSON line per run.
#   MONAI_PYTHON=/work/monai_venv/bin/python benchmarks/side_by_side.sh [ROUNDS] [STEPS]
# Allocator: prefix with e.g.
#   LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
# (both processes inherit it). A compilation cache makes our later rounds skip XLA compile.
set -u
rounds=${1:-2}; steps=${2:-5}
py=${PYTHON:-python}; monai_py=${MONAI_PYTHON:-/work/monai_venv/bin/python}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/unet_ds_jax_cache}
keys='["step_s_median","step_s_min","step_s_max","step_cpu_s_median","load_avg_1min","conv_impl","threads"]'
summarize() { "$py" -c "import json,sys; d=json.loads(sys.stdin.readlines()[-1]); \
print(json.dumps({'run': sys.argv[1], **{k: d[k] for k in json.loads(sys.argv[2]) if k in d}}))" "$1" "$keys"; }
for r in $(seq "$rounds"); do
  "$py" -m unet_ds.bench --config=configs/unet3d.py:bench_ref --mode=train --steps="$steps" \
    --warmup=1 2>/dev/null | summarize "unet_ds round $r"
  "$monai_py" benchmarks/monai_dynunet.py --steps="$steps" --warmup=1 2>/dev/null \
    | summarize "monai round $r"
done
