#!/usr/bin/env bash
# Ours (`unet_ds.bench`, bench_ref) and MONAI DynUNet (benchmarks/monai_dynunet.py), alternated
# ROUNDS times per dimensionality under the same environment (allocator, threads), one JSON line
# per run: step times, peak host RSS, threads, load.
#   MONAI_PYTHON=/work/monai_venv/bin/python benchmarks/side_by_side.sh [ROUNDS] [STEPS] [DIMS]
# DIMS: "3 2" (default), "3" or "2". Allocator: prefix with e.g.
#   LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1
# (both processes inherit it). A compilation cache makes our later rounds skip XLA compile.
set -u
rounds=${1:-2}; steps=${2:-5}; dims=${3:-3 2}
py=${PYTHON:-python}; monai_py=${MONAI_PYTHON:-/work/monai_venv/bin/python}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/unet_ds_jax_cache}
keys='["step_s_median","step_s_min","step_s_max","step_cpu_s_median","peak_rss_mb","train_peak_rss_mb","step_temp_mb","baseline_rss_mb","threads","load_avg_1min","conv_impl"]'
summarize() { "$py" -c "import json,sys; d=json.loads(sys.stdin.readlines()[-1]); \
print(json.dumps({'run': sys.argv[1], **{k: d[k] for k in json.loads(sys.argv[2]) if k in d}}))" "$1" "$keys"; }
for d in $dims; do
  for r in $(seq "$rounds"); do
    "$py" -m unet_ds.bench --config="configs/unet${d}d.py:bench_ref" --mode=train \
      --steps="$steps" --warmup=1 2>/dev/null | summarize "unet_ds ${d}d round $r"
    "$monai_py" benchmarks/monai_dynunet.py --dims="$d" --steps="$steps" --warmup=1 2>/dev/null \
      | summarize "monai ${d}d round $r"
  done
done
