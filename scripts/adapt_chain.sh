#!/usr/bin/env bash
# The RAT+ adaptation workflow end to end, on the debug model, in one command:
#
#   1. pretrain   dense + joint training (D=64 step, then dense step) -> DCP checkpoint
#   2. adapt      load that checkpoint (model only), set the target pattern D=4/W=8/S=2, train a few steps
#   3. export     both checkpoints -> ratplus-export folders (model.safetensors, config.json, tokenizer)
#   4. evaluate   lm-eval (model "ratplus") on the local tiny multiple-choice and perplexity tasks:
#                 pretrained dense, pretrained under D=4/W=8/S=2 (no adaptation), adapted under D=4/W=8/S=2
#   5. report     a metrics table (training losses, accuracy, perplexity)
#
#   scripts/adapt_chain.sh [OUT_DIR]          # default OUT_DIR: outputs/adapt_chain
#
# Training goes through ./run_train.sh (torchrun on a GPU machine, python -m ratplus_titan.infra.cpu otherwise).
# Knobs (environment): PYTHON (.venv/bin/python if it exists, else python), CONFIG_FILE
# (train_configs/debug_model.toml), PRETRAIN_STEPS (40), ADAPT_STEPS (20), SEQ_LEN (256), BATCH (4),
# ADAPT_LR (2e-4), DILATION/LOCAL_WINDOW/SINKS (4/8/2), TASKS (ratplus_tiny_mc,ratplus_tiny_ppl),
# EVAL_BATCH (8), LIMIT (empty = all documents), EVALS (which of "pretrained_dense pretrained_sparse
# adapted" to evaluate; default all three).
# For a real model the same steps apply with train_configs/adapt_1b_d16_w256_s4.toml (see README.md).
set -euo pipefail
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
OUT=""
if [ -n "${1:-}" ]; then mkdir -p "$1" && OUT=$(cd "$1" && pwd); fi  # relative to where it was called from
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/outputs/adapt_chain}
source scripts/find_python.sh  # PYTHON: as given, else .venv/bin/python, else python
CONFIG_FILE=${CONFIG_FILE:-train_configs/debug_model.toml}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-40}
ADAPT_STEPS=${ADAPT_STEPS:-20}
SEQ_LEN=${SEQ_LEN:-256}
BATCH=${BATCH:-4}
ADAPT_LR=${ADAPT_LR:-2e-4}
DILATION=${DILATION:-4}
LOCAL_WINDOW=${LOCAL_WINDOW:-8}
SINKS=${SINKS:-2}
TASKS=${TASKS:-ratplus_tiny_mc,ratplus_tiny_ppl}
EVAL_BATCH=${EVAL_BATCH:-8}
LIMIT=${LIMIT:-}
EVALS=${EVALS:-pretrained_dense pretrained_sparse adapted}
PATTERN="d${DILATION}w${LOCAL_WINDOW}s${SINKS}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() { echo; echo "==== adapt_chain: $* ===="; }
common=(--training.seq_len "$SEQ_LEN" --training.local_batch_size "$BATCH" --metrics.disable_color_printing
        --checkpoint.enable --checkpoint.async_mode disabled)

step "1/5 pretrain $PRETRAIN_STEPS steps (joint training) -> $OUT/pretrain"
rm -rf "$OUT/pretrain"
CONFIG_FILE=$CONFIG_FILE PYTHON=$PYTHON ./run_train.sh "${common[@]}" \
  --job.dump_folder "$OUT/pretrain" --training.steps "$PRETRAIN_STEPS" --checkpoint.interval "$PRETRAIN_STEPS" \
  --ratplus.joint_train --ratplus.joint_dilation "$(( SEQ_LEN < 64 ? SEQ_LEN : 64 ))" \
  2>&1 | tee "$OUT/pretrain.log"
PRETRAINED="$OUT/pretrain/checkpoint/step-$PRETRAIN_STEPS"

step "2/5 adapt to $PATTERN for $ADAPT_STEPS steps from $PRETRAINED -> $OUT/adapt"
rm -rf "$OUT/adapt"
CONFIG_FILE=$CONFIG_FILE PYTHON=$PYTHON ./run_train.sh "${common[@]}" \
  --job.dump_folder "$OUT/adapt" --job.description "RAT+ debug model adapted to $PATTERN" --training.steps "$ADAPT_STEPS" --checkpoint.interval "$ADAPT_STEPS" \
  --ratplus.no-joint-train --ratplus.dilation "$DILATION" --ratplus.local_window "$LOCAL_WINDOW" --ratplus.sinks "$SINKS" \
  --optimizer.lr "$ADAPT_LR" --lr_scheduler.warmup_steps 0 \
  --checkpoint.initial_load_path "$PRETRAINED" --checkpoint.initial_load_model_only \
  2>&1 | tee "$OUT/adapt.log"

step "3/5 export"
rm -rf "$OUT/export_pretrained" "$OUT/export_adapted"
case " $EVALS " in *" pretrained_"*)  # the pretrained model is only needed for the comparison rows
  "$PYTHON" -m ratplus_titan.adapters.export "$PRETRAINED" "$OUT/export_pretrained" --dtype float32 ;;
esac
"$PYTHON" -m ratplus_titan.adapters.export "$OUT/adapt/checkpoint" "$OUT/export_adapted" --pattern "$PATTERN" --dtype float32

DEVICE=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; fi
step "4/5 lm-eval ($TASKS) on $DEVICE"
rm -rf "$OUT/eval"
evaluate() {  # NAME MODEL_DIR PATTERN
  rm -rf "$OUT/eval/$1"
  "$PYTHON" -m ratplus_titan.eval.lm_eval_adapter --model ratplus \
    --model_args "path=$2,pattern=$3,dtype=float32,batch_size=$EVAL_BATCH" \
    --tasks "$TASKS" --device "$DEVICE" ${LIMIT:+--limit "$LIMIT"} --output_path "$OUT/eval/$1" \
    > "$OUT/eval_$1.log" 2>&1 || { tail -30 "$OUT/eval_$1.log" >&2; echo "adapt_chain: lm-eval failed for $1" >&2; exit 1; }
  echo "-- $1"; grep -E '^\|' "$OUT/eval_$1.log" || true
}
for which in $EVALS; do
  case $which in
    pretrained_dense) evaluate pretrained_dense "$OUT/export_pretrained" dense ;;
    pretrained_sparse) evaluate "pretrained_$PATTERN" "$OUT/export_pretrained" "$PATTERN" ;;
    adapted) evaluate "adapted_$PATTERN" "$OUT/export_adapted" "$PATTERN" ;;
    *) echo "adapt_chain: EVALS entry '$which' is unknown: allowed are pretrained_dense, pretrained_sparse, adapted" >&2; exit 2 ;;
  esac
done

step "5/5 metrics"
"$PYTHON" - "$OUT" "$PATTERN" <<'EOF'
import glob, json, re, sys
out, pattern = sys.argv[1], sys.argv[2]

def last_loss(log, key):
    values = re.findall(rf"{key}:?\s+([0-9.]+)", open(log, encoding="utf-8", errors="replace").read())
    return float(values[-1]) if values else float("nan")

rows = [
    ("pretrained", "dense", f"{out}/eval/pretrained_dense"),
    ("pretrained (not adapted)", pattern, f"{out}/eval/pretrained_{pattern}"),
    ("adapted", pattern, f"{out}/eval/adapted_{pattern}"),
]
metrics = [("ratplus_tiny_mc", "acc,none", "mc acc"), ("ratplus_tiny_mc", "acc_norm,none", "mc acc_norm"),
           ("ratplus_tiny_ppl", "word_perplexity,none", "word ppl"), ("ratplus_tiny_ppl", "bits_per_byte,none", "bits/byte")]
print(f"training: pretrain final loss {last_loss(f'{out}/pretrain.log', 'loss'):.4f} "
      f"(sparse phase {last_loss(f'{out}/pretrain.log', 'loss_sparse'):.4f}); "
      f"adapt ({pattern}) final loss {last_loss(f'{out}/adapt.log', 'loss'):.4f}")
print()
print("| model | pattern | " + " | ".join(m[2] for m in metrics) + " |")
print("|---" * (len(metrics) + 2) + "|")
table = []
for name, pat, folder in rows:
    files = sorted(glob.glob(f"{folder}/*/results_*.json"))
    if not files:
        continue  # not in EVALS
    results = json.load(open(files[-1]))["results"]
    values = [results.get(task, {}).get(key) for task, key, _ in metrics]
    table.append({"model": name, "pattern": pat, **{m[2]: v for m, v in zip(metrics, values)}})
    print(f"| {name} | {pat} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in values) + " |")
json.dump(table, open(f"{out}/metrics.json", "w"), indent=1)
print(f"\nadapt_chain: wrote {out}/metrics.json")
EOF
