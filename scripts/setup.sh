#!/usr/bin/env bash
# Sets up .venv for basinguard on a fresh machine (CPU).
#   bash scripts/setup.sh          runtime only: numpy, onnxruntime, onnx, tokenizers, pillow, tqdm (no torch)
#   bash scripts/setup.sh test     + export and test extras; torch pinned to the CPU build 2.13.0
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
PIP=".venv/bin/pip"
$PIP install -q --upgrade pip >/dev/null
if [ "${1:-}" = "test" ]; then
  # Pin torch first: an unpinned torch resolves to a multi-GB CUDA build.
  $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[cpu,export,test,ray,c2pa,shards]" "torch==2.13.0"
  # The real CLIP BPE vocabulary ships inside open_clip_torch; its data file is all the tests use.
  $PIP install -q --no-deps "open_clip_torch==3.3.0"
  # TensorRT's type stubs for the static check; --no-deps: their metadata pins tensorrt, which needs an NVIDIA GPU.
  $PIP install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
else
  $PIP install -q -e ".[cpu]"  # onnxruntime's CPU build: an extra, so a GPU install has only onnxruntime-gpu
fi
