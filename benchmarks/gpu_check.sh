#!/usr/bin/env bash
# GPU check for basinguard's backends; run from anywhere: bash benchmarks/gpu_check.sh [gpu_check.py flags]
#   Builds TensorRT plans (when tensorrt is installed), checks ORT-CUDA / TensorRT against ORT-CPU, and times
#   torch eager, ORT-CUDA, TensorRT and TensorRT + CUDA graphs with cfg, og-dtp and stp. Backends that are not
#   installed are skipped with the reason. Fits in 8 minutes: the Python side stops starting sections at 450 s,
#   and a hard timeout stops everything at 470 s.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # basinguard from this checkout, no install needed

need() { "$PY" -c "import $1" >/dev/null 2>&1; }

for mod in numpy onnxruntime; do
  if ! need "$mod"; then
    echo "gpu_check: $mod is missing; trying pip (offline machines: install it first)" >&2
    timeout 60 "$PY" -m pip install -q --timeout 10 --retries 0 "$mod" >&2 || { echo "gpu_check: cannot install $mod" >&2; exit 2; }
  fi
done
# diffusers gives the real UNet2DConditionModel; without it (offline) benchmarks/sd_unet.py builds the same network.
if ! need diffusers; then
  if timeout 60 "$PY" -m pip install -q --no-deps --timeout 10 --retries 0 "diffusers==0.36.0" >/dev/null 2>&1 && need diffusers; then
    echo "gpu_check: installed diffusers 0.36.0 (--no-deps)"
  else
    echo "gpu_check: diffusers not importable (offline, or its dependencies missing): using benchmarks/sd_unet.py," \
         "the same SD1.5 UNet layout with diffusers' parameter names and count"
  fi
fi
# onnx: only torch.onnx.export needs it, to hand the SD UNet to ORT-CUDA / TensorRT.
need onnx || timeout 60 "$PY" -m pip install -q --timeout 10 --retries 0 onnx >/dev/null 2>&1 || true
need tokenizers || echo "gpu_check: tokenizers missing: the shipped model's whole-generation runs are skipped"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout -k 10 470 "$PY" benchmarks/gpu_check.py "$@"
