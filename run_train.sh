#!/usr/bin/env bash
# Train with torchtitan + ratplus_titan from a checkout: `ratplus-train` (ratplus_titan/infra/launch.py)
# with the environment of torchtitan's run_train.sh.
#   NGPU=8 CONFIG_FILE=train_configs/ratplus_1b.toml ./run_train.sh [--extra.torchtitan args]
# With GPUs: torchrun --nproc_per_node=NGPU -m ${TRAIN_FILE:-ratplus_titan.train}. Without: one CPU process
# with gloo (ratplus_titan/infra/cpu.py): torchtitan 0.2.2 assumes CUDA when no accelerator is present.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/find_python.sh  # PYTHON: as given, else .venv/bin/python, else python
exec "$PYTHON" -m ratplus_titan.infra.launch --config "${CONFIG_FILE:-train_configs/debug_model.toml}" "$@"
