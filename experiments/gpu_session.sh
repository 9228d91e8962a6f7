#!/usr/bin/env bash
# One GPU session (H100/H200 class), at most GPU_BUDGET_SECONDS (540 s) of work:
#   1. nvidia-smi and the versions on the machine;
#   2. experiments.benchmark: ms per step, vmap/sequential ratios, SGD vs Parle n=1 (LeNet, WRN-16-4);
#   3. experiments.roofline: step FLOP/s against the GPU's matmul rate;
#   4. Fashion-MNIST LeNet at the paper's budget (5 Parle epochs = 125 effective epochs):
#      Parle n=3 against SGD (125 epochs), local SGD and DiLoCo (n=3, L=25, 125 epochs), seed 0,
#      then seeds 1 and 2 while time is left;
#      then experiments.report's tables.
# It reads the prepared data (.npz) and installs ml_collections from wheels, both brought in
# .carry/ (`make gpu-carry` builds it on a CPU machine): the GPU machine has no network, no
# TensorFlow, no TFDS and no ml_collections. Everything it writes goes to $OUT (default
# ./gpu_out); training workdirs (checkpoints) go to $RUNS_DIR (default /tmp/parle_gpu_runs).
#
#   bash experiments/gpu_session.sh                 # on the GPU machine, from the repository root
#   GPU_SMOKE=1 bash experiments/gpu_session.sh     # the same plumbing at tiny sizes (any machine)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
RUNS_DIR=${RUNS_DIR:-/tmp/parle_gpu_runs}
CARRY=${CARRY:-$PWD/.carry}
BUDGET=${GPU_BUDGET_SECONDS:-540}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT" "$RUNS_DIR"
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
step() { echo "[$(($(date +%s) - start)) s] $*" | tee -a "$OUT/session.log"; }

export PARLE_DATA_DIR="$CARRY/data"
export PARLE_COMPILATION_CACHE="$RUNS_DIR/jax_cache"
if [ ! -f "$PARLE_DATA_DIR/fashion_mnist/train.npz" ]; then
  step "no $PARLE_DATA_DIR/fashion_mnist/train.npz: run 'make gpu-carry' and bring .carry/"; exit 1
fi
if ! "$PYTHON" -c 'import ml_collections' 2>/dev/null; then
  step "installing ml_collections from $CARRY/wheels"
  "$PYTHON" -m pip install --quiet --no-index --find-links "$CARRY/wheels" ml_collections \
    >> "$OUT/session.log" 2>&1 || { step "ml_collections did not install"; exit 1; }
fi
(nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
"$PYTHON" -c 'import jax, flax, optax, sys; print(sys.version); print("jax", jax.__version__,
"flax", flax.__version__, "optax", optax.__version__); print(jax.devices())' > "$OUT/versions.txt" 2>&1

if [ -n "${GPU_SMOKE:-}" ]; then  # tiny sizes: checks the plumbing, not the GPU
  BENCH_ARGS=(--models=lenet --L=2 --batch=8 --replicas=3 --repeats=1 --optimizers=sgd,parle)
  ROOF_ARGS=(--models=lenet --L=2 --repeats=1)
  SUITE_ARGS=(--suite=fashion_mnist_lenet_sweep --only=parle_n3_r12,sgd_replica_budget_r12)
  SEEDS=(0)
else
  BENCH_ARGS=(--models=lenet,wrn16_4 --replicas=3 --optimizers=sgd,parle)
  ROOF_ARGS=()
  SUITE_ARGS=(--suite=fashion_mnist_lenet_paper --only=parle,sgd_n1,local_sgd,diloco)
  SEEDS=(0 1 2)
fi

step "benchmark"
timeout $(($(left) / 3)) "$PYTHON" -m experiments.benchmark "${BENCH_ARGS[@]}" \
  --json_out="$OUT/benchmark.json" > "$OUT/benchmark.txt" 2> "$OUT/benchmark.log"
step "benchmark exit $?"

step "roofline"
timeout $(($(left) / 3)) "$PYTHON" -m experiments.roofline "${ROOF_ARGS[@]}" \
  --json_out="$OUT/roofline.json" > "$OUT/roofline.txt" 2> "$OUT/roofline.log"
step "roofline exit $?"

suite=${SUITE_ARGS[0]#--suite=}
for seed in "${SEEDS[@]}"; do
  if [ "$(left)" -lt 60 ]; then step "out of time before seed $seed"; break; fi
  step "training seed $seed"
  timeout "$(left)" "$PYTHON" -m experiments.suite "${SUITE_ARGS[@]}" --seeds="$seed" \
    --runs_dir="$RUNS_DIR" --results_dir="$OUT/results" >> "$OUT/suite.log" 2>&1
  step "seed $seed exit $?"
done
if [ -d "$OUT/results/$suite" ]; then
  "$PYTHON" -m experiments.report --results_dir="$OUT/results" --suite="$suite" \
    > "$OUT/report.md" 2>> "$OUT/session.log"
  step "report exit $?"
fi
step "done"
