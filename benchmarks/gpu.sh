#!/usr/bin/env bash
# Every GPU measurement in one run, most needed first, each part under its own time limit so that a slow part
# costs only itself (about 5 minutes in all on an H200). Needs torch with CUDA, gymnasium, minigrid,
# stable-baselines3, sb3-contrib and pytest; writes logs, JSON and summaries to $OUT (default gpu_results/).
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
TLB_CORES=tlb,tlb:clock=episode,tlb:slow_update=parallel

part() {  # part NAME SECONDS COMMAND...: run it, log to $OUT/NAME.txt, and say how it ended
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  grep -v '^[ {}\[\]"]' "$OUT/$name.txt" | tail -25
  echo "== $name: rc $rc in $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# Same results on the GPU as on the CPU, and one call as T steps, for every core config of the tests.
# The training pass replayed from CUDA graphs equals the eager one, in cores, PPO and BC.
part equivalence 150 "$PY" -m pytest tests/test_cores.py tests/test_cuda_graphs.py -q -k "cuda or graph" -p no:cacheprovider
for shape in 16x128 16x1024; do
  part "cores_$shape" 100 "$PY" benchmarks/cores.py --device cuda --shape "$shape" --repeats 10 \
    --cores "$TLB_CORES,lstm,gru,transformer" --json-out "$OUT/cores_$shape.json"
done
part cuda_graph 60 "$PY" benchmarks/cuda_graph.py --shapes 16x128,16x1024 --cores tlb --repeats 10
# The main job's path on the GPU: train (progress, evaluation, checkpoint, plot), then evaluate the checkpoint.
part train_cuda 90 bash -c "rm -rf /tmp/gpu_run && $PY -m commands.cli train --config configs/ppo/doorkey5.yaml \
  device=cuda total_frames=4096 eval_every=2048 eval_episodes=10 run_dir=/tmp/gpu_run \
  && $PY -m commands.cli eval /tmp/gpu_run --episodes 10 && ls /tmp/gpu_run /tmp/gpu_run/checkpoints"
part throughput_cuda_64 150 "$PY" benchmarks/throughput.py --device cuda --n-envs 64 --rounds 2 \
  --frames $((64 * 128 * 4)) --agents tlb,tlb:cuda_graphs=true,tlb:clock=episode,lstm,transformer:cuda_graphs=true \
  --json-out "$OUT/throughput_cuda_64.json"
part throughput_cuda_8 60 "$PY" benchmarks/throughput.py --device cuda --n-envs 8 --rounds 2 \
  --frames $((8 * 128 * 6)) --agents tlb,tlb:cuda_graphs=true,lstm --json-out "$OUT/throughput_cuda_8.json"
part throughput_cpu_64 90 "$PY" benchmarks/throughput.py --device cpu --n-envs 64 --rounds 2 \
  --frames $((64 * 128 * 2)) --agents tlb,lstm --json-out "$OUT/throughput_cpu_64.json"
# Last, as it compiles for a minute or more: compile=true on the GPU (default inductor mode, no CUDA graphs).
part throughput_cuda_64_compiled 150 "$PY" benchmarks/throughput.py --device cuda --n-envs 64 --rounds 2 \
  --frames $((64 * 128 * 2)) --agents tlb,tlb:compile=true --json-out "$OUT/throughput_cuda_64_compiled.json"
