#!/usr/bin/env bash
# The whole test suite on a CUDA machine (`make test-gpu`), workers in parallel (pytest-xdist).
#
# Offline (the lent GPU machines): a wheelhouse in .whl/ (../shared/tools/device-wheels.sh builds it)
# is installed into .gpu-site/ and the checkout is used from PYTHONPATH, with the machine's own torch.
# Online: `make install` builds .venv with the CUDA torch from pyproject.toml's range.
#   JOBS=8 [SUITE_TIMEOUT=540] bash scripts/test_gpu.sh [pytest args]     (default: every test under tests/)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-8}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  PY=${PYTHON:-python3}
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .gpu-site .whl/*.whl
  export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  make install
  PY=.venv/bin/python
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "test-gpu: torch.cuda.is_available() is False on this machine; run 'make test' instead" >&2
  exit 2
fi
"$PY" -c 'import torch, triton; print(f"test-gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")'
export PYTHONUNBUFFERED=1
if [ $# -eq 0 ]; then set -- tests; fi
export RATPLUS_LIVE_FAILURES=1  # each failure named as it happens (tests/conftest.py), also in a run cut off
# A test that hangs (a GPU run waiting on a peer, say) fails after TEST_TIMEOUT seconds with its stacks, where
# pytest-timeout is installed (the device image has it), instead of holding the whole run past its limit.
TIMEOUT_ARGS=()
if "$PY" -c 'import pytest_timeout' 2>/dev/null; then TIMEOUT_ARGS=(--timeout "${TEST_TIMEOUT:-300}"); fi
# SUITE_TIMEOUT=<seconds>: interrupt the whole run then (SIGINT): pytest still prints its summary, and
# tests/conftest.py names the tests still running (LIVE-RUNNING); tests over 30 s are named as they end (LIVE-SLOW).
PYTEST=("$PY" -m pytest -q -n "$JOBS" --dist loadgroup -p no:cacheprovider --durations=20 "${TIMEOUT_ARGS[@]}" "$@")
if [ -n "${SUITE_TIMEOUT:-}" ]; then
  exec timeout -s INT -k 30 "$SUITE_TIMEOUT" "${PYTEST[@]}"
fi
exec "${PYTEST[@]}"
