#!/usr/bin/env bash
# Train with torchtitan + ratplus_titan (our copy of torchtitan's run_train.sh).
#   NGPU=8 CONFIG_FILE=train_configs/ratplus_1b.toml ./run_train.sh [--extra.torchtitan args]
# On a machine without a GPU it runs one CPU process with gloo (ratplus_titan/infra/cpu.py):
# torchtitan 0.2.2 assumes CUDA when no accelerator is present.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/find_python.sh  # PYTHON: as given, else .venv/bin/python, else python
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}
TRAIN_FILE=${TRAIN_FILE:-ratplus_titan.train}
NGPU=${NGPU:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
if [ "$NGPU" -gt 0 ]; then
  exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPU" --rdzv_backend c10d --rdzv_endpoint=localhost:0 \
    --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3 \
    -m "$TRAIN_FILE" --job.config_file "$CONFIG_FILE" "$@"
fi
echo "run_train.sh: no GPU found; training on CPU (one process, gloo)" >&2
exec "$PYTHON" -m ratplus_titan.infra.cpu --trainer ratplus_titan.train:RATPlusTrainer -- --job.config_file "$CONFIG_FILE" "$@"
