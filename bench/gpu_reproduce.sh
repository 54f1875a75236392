#!/usr/bin/env bash
# Device-side set-up for the reproduction (README "Does it work?"): the wheelhouse (.whl, built by
# ../shared/tools/device-wheels.sh), this checkout on PYTHONPATH, then python -m bench.reproduce.
# Carry .whl and data/gutenberg/{train,validation}.jsonl.xz (data/README.md), then e.g.
#   bash bench/gpu_reproduce.sh --scale 50m --out $OUT --deadline-min 8.5
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
exec python3 -m bench.reproduce "$@"
