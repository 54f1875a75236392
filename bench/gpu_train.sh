#!/usr/bin/env bash
# Device-side set-up for the training benchmarks: the wheelhouse (.whl, built by
# ../shared/tools/device-wheels.sh), this package, then bench.train_throughput:
#   bash bench/gpu_train.sh --flavor 1B --variants ratplus,llama3 --out $OUT
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# the checkout itself is importable (ratplus_titan/__init__.py maps kernels/, adapters/, eval/)
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
exec python3 -m bench.train_throughput "$@"
