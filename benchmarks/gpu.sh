#!/usr/bin/env bash
# Every GPU measurement in one run (under 5 minutes on an H100/H200, and the compiled run at the end). Needs torch
# with CUDA, gymnasium, minigrid, stable-baselines3 and sb3-contrib; writes JSON and summaries to $OUT
# (default gpu_results/).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# Same results on the GPU as on the CPU, one call as T steps (a few seconds; pytest is one more wheel to carry).
if "$PY" -c "import pytest" 2>/dev/null; then
  "$PY" -m pytest tests/test_cores.py -q -k cuda 2>&1 | tail -3 | tee "$OUT/equivalence.txt"
else
  echo "pytest missing: GPU equivalence tests not run" | tee "$OUT/equivalence.txt"
fi
for shape in 16x128 16x1024; do
  "$PY" benchmarks/cores.py --device cuda --shape "$shape" --repeats 10 \
    --cores tlb,tlb:slow_update=parallel,tlb:chunk_size=8,lstm,transformer --json-out "$OUT/cores_$shape.json" \
    > /dev/null 2> "$OUT/cores_$shape.txt"
  cat "$OUT/cores_$shape.txt"
done
"$PY" benchmarks/cuda_graph.py --shapes 2x128,16x128,16x1024 > "$OUT/cuda_graph.txt"
cat "$OUT/cuda_graph.txt" | grep -v '^[ {}]'
for envs in 8 64; do
  "$PY" benchmarks/throughput.py --device cuda --n-envs "$envs" --rounds 2 --frames $((envs * 128 * 6)) \
    --agents tlb,lstm,none --json-out "$OUT/throughput_cuda_$envs.json" | tail -12
done
"$PY" benchmarks/throughput.py --device cpu --n-envs 64 --rounds 2 --frames $((64 * 128 * 4)) \
  --agents tlb,lstm,none,ppo_mlp --json-out "$OUT/throughput_cpu_64.json" | tail -12
# Last, as it compiles for a minute or more: compile=true on the GPU (default inductor mode, no CUDA graphs).
"$PY" benchmarks/throughput.py --device cuda --n-envs 64 --rounds 2 --frames $((64 * 128 * 4)) \
  --agents tlb,tlb:compile=true,lstm --json-out "$OUT/throughput_cuda_64_compiled.json" | tail -14
