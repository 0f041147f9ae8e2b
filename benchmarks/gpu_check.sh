#!/usr/bin/env bash
# GPU check for basinguard's backends; run from anywhere: bash benchmarks/gpu_check.sh [gpu_check.py flags]
#   Builds TensorRT plans (when tensorrt is installed), checks ORT-CUDA / TensorRT against ORT-CPU, and times
#   torch eager, ORT-CUDA, TensorRT and TensorRT + CUDA graphs with cfg, og-dtp and stp. Backends that are not
#   installed are skipped with the reason. Fits in 8 minutes (GPU_CHECK_BUDGET_S, default 480), everything counted
#   from the start: the pip attempts for missing packages get what is left (at most 60 s each, and never the time
#   gpu_check.py needs), gpu_check.py stops starting sections 20 s before its hard timeout, which leaves 10 s.
set -uo pipefail
START_S=$SECONDS
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # basinguard from this checkout, no install needed
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
MIN_CHECK_S=120  # what gpu_check.py is kept for: the environment and the quick sections

exec 3>&2  # pip_try's own messages, also where a caller silences pip
left() { echo $((BUDGET_S - (SECONDS - START_S))); }
need() { "$PY" -c "import $1" >/dev/null 2>&1; }
# pip_try ARGS...: pip install within what the budget can spare (at most 60 s); fails when it cannot spare 5 s.
pip_try() {
  local spare=$(( $(left) - MIN_CHECK_S ))
  (( spare > 60 )) && spare=60
  if (( spare < 5 )); then
    echo "gpu_check: no time left in the ${BUDGET_S} s budget to pip install $*" >&3
    return 1
  fi
  timeout "$spare" "$PY" -m pip install -q --timeout 10 --retries 0 "$@"
}

for mod in numpy onnxruntime; do
  if ! need "$mod"; then
    echo "gpu_check: $mod is missing; trying pip (offline machines: install it first)" >&2
    pip_try "$mod" >&2 || { echo "gpu_check: cannot install $mod" >&2; exit 2; }
  fi
done
# diffusers gives the real UNet2DConditionModel; without it (offline) benchmarks/sd_unet.py builds the same network.
if ! need diffusers; then
  if pip_try --no-deps "diffusers==0.36.0" >/dev/null 2>&1 && need diffusers; then
    echo "gpu_check: installed diffusers 0.36.0 (--no-deps)"
  else
    echo "gpu_check: diffusers not importable (offline, or its dependencies missing): using benchmarks/sd_unet.py," \
         "the same SD1.5 UNet layout with diffusers' parameter names and count"
  fi
fi
# onnx: only torch.onnx.export needs it, to hand the SD UNet to ORT-CUDA / TensorRT.
need onnx || pip_try onnx >/dev/null 2>&1 || true
need tokenizers || echo "gpu_check: tokenizers missing: the shipped model's whole-generation runs are skipped"
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 10 nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
fi
hard_s=$(( $(left) - 10 ))  # 10 s for timeout's kill and the shell
echo "gpu_check: $hard_s s of the ${BUDGET_S} s budget left for gpu_check.py"
exec timeout -k 5 "$hard_s" "$PY" benchmarks/gpu_check.py --budget-s "$((hard_s - 20))" "$@"
