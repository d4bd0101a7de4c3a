#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (CI has none; run this on a machine with one, from the repo root):
#   1. tests/test_gpu.py (every method in bf16, fp32 = CPU, exact resume, torchrun on NCCL with DDP and FSDP2,
#      the evaluation suite) and the CUDA test of the circuit simulator;
#   2. benchmarks/train_speed.py in bf16: the default model, a wider one, and a 128k vocabulary;
#   3. `tunelab demo` (runs/demo), then the method bake-off on its world (runs/compare-demo), each under a time
#      limit; skipped with --quick.
# Usage: benchmarks/gpu_checks.sh OUT_DIR [--quick]      (python: $PYTHON, default python3)
set -u
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR [--quick]}
quick=${2:-}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $py -c "import sys, torch, transformers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$out/versions.txt"

$py -m pytest -q -s -p no:cacheprovider tests/test_gpu.py tests/test_quantum.py::test_cuda_matches_cpu 2>&1 \
  | tee "$out/tests.log" | grep -E "difference|losses|passed|failed|FAILED|Error" | cut -c1-400

run_speed() {  # name, then train_speed.py arguments
  local name=$1; shift
  echo "== train_speed $name: $*"
  $py benchmarks/train_speed.py --precision bf16 --json "$out/speed_$name.json" "$@" > "$out/speed_$name.log" 2>&1
  tail -n 25 "$out/speed_$name.log"
}
run_speed default
run_speed wide --hidden 2048 --layers 8 --heads 16 --kv-heads 16 --intermediate 5504 --batch 4
run_speed vocab128k --vocab 128256 --hidden 2048 --layers 4 --heads 16 --kv-heads 16 --intermediate 5504 --batch 4

[ "$quick" = "--quick" ] && exit 0
echo "== demo (runs/demo), then the bake-off on its world (runs/compare-demo)"
timeout 300 $py -m tunelab demo > "$out/demo.log" 2>&1; echo "demo exit code $?"
tail -n 30 "$out/demo.log"
timeout 400 $py -m tunelab compare examples/compare_demo.yaml > "$out/compare.log" 2>&1; echo "compare exit code $?"
tail -n 30 "$out/compare.log"
cp runs/compare-demo/results.csv "$out/compare_results.csv" 2>/dev/null
