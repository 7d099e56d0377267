# Sourced by the reproduction scripts: shared settings and helpers.
#
# Every setting comes from the environment:
#   DATA_ROOT   folder holding each data set in its standard layout: $DATA_ROOT/MVTec,
#               $DATA_ROOT/VisA, $DATA_ROOT/BTAD, ... (default: data)
#   OUT         where the runs go, one folder per trained model (default: runs/reproduce)
#   MODEL_NAME  backbone (default: ViT-L-14-336, the papers'; tiny for a smoke test)
#   PRETRAINED  open_clip weight tag or a local weights file (default: openai)
#   DEVICE      auto, cpu, cuda, cuda:1, ... (default: auto)
#   SEED        training seed (default: the paper's, or its code's default)
#   SUBSTITUTE  run every data set as this one instead, e.g. Synthetic (smoke tests); results
#               keep the paper's data set names so paper_table.py can line them up
#   TRAIN_ARGS, TEST_ARGS   extra flags for train.py / test.py, e.g. "--amp bf16"
#   PYTHON      interpreter (default: python)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

DATA_ROOT="${DATA_ROOT:-data}"
OUT="${OUT:-runs/reproduce}"
MODEL_NAME="${MODEL_NAME:-ViT-L-14-336}"
PRETRAINED="${PRETRAINED:-openai}"
DEVICE="${DEVICE:-auto}"
SUBSTITUTE="${SUBSTITUTE:-}"
PYTHON="${PYTHON:-python}"
read -ra TRAIN_EXTRA <<< "${TRAIN_ARGS:-}"
read -ra TEST_EXTRA <<< "${TEST_ARGS:-}"
BACKBONE=(--model_name "$MODEL_NAME" --pretrained "$PRETRAINED" --device "$DEVICE")
# test.py rebuilds the model from its checkpoint; only where the weights are read from may change.
TEST_BACKBONE=(--pretrained "$PRETRAINED" --device "$DEVICE")

# log MESSAGE: one line on stderr, in the Python scripts' log format.
log() {
    echo "$(date '+%Y-%m-%d %H:%M:%S') INFO reproduce: $*" >&2
}

# test_sets VARIABLE TRAIN: sets TESTS to the data sets listed in $VARIABLE. When it lists none,
# logs that the model trained on TRAIN is skipped and returns 1: a model tested nowhere is not
# trained.
test_sets() {
    read -ra TESTS <<< "${!1}"
    if [ "${#TESTS[@]}" -eq 0 ]; then
        log "$1 is empty: skipping the model trained on $2 (no training, no evaluation)"
        return 1
    fi
}

# data_flags NAME: sets DATA to the flags of the paper's data set NAME (or of SUBSTITUTE).
data_flags() {
    local name="${SUBSTITUTE:-$1}"
    DATA=(--dataset "$name" --data_root "$DATA_ROOT/$name")
}

# write_manifest RUN METHOD SETTING TRAIN SEED CHECKPOINT PRO_VARIANT: reproduce.json in RUN,
# what paper_table.py reads to find the paper's numbers for this run.
write_manifest() {
    "$PYTHON" - "$@" "$MODEL_NAME" "$PRETRAINED" "$SUBSTITUTE" <<'PY'
import datetime, json, os, sys, tempfile
run, method, setting, train, seed, checkpoint, pro, model, pretrained, substitute = sys.argv[1:]
manifest = {
    "method": method, "setting": setting, "train": train, "seed": int(seed),
    "checkpoint": checkpoint, "pro_variant": pro, "model_name": model, "pretrained": pretrained,
    "substitute": substitute or None, "date": datetime.datetime.now().isoformat(timespec="seconds"),
}
os.makedirs(run, exist_ok=True)
handle, tmp = tempfile.mkstemp(dir=run, suffix=".tmp")
with os.fdopen(handle, "w") as file:
    json.dump(manifest, file, indent=2)
os.replace(tmp, os.path.join(run, "reproduce.json"))
PY
}

# evaluate RUN CHECKPOINT TEST [test.py flags...]: results in RUN/eval/TEST/.
evaluate() {
    local run="$1" checkpoint="$2" test="$3"
    shift 3
    data_flags "$test"
    "$PYTHON" test.py "${DATA[@]}" "${TEST_BACKBONE[@]}" --checkpoint "$checkpoint" \
        --results_dir "$run/eval/$test" "$@" "${TEST_EXTRA[@]}"
}
