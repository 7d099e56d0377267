#!/usr/bin/env bash
# FE-CLIP zero-shot tables (the paper's Tables 1 and 2): fine-tune on MVTec AD's test split and
# test on the other data sets; fine-tune on VisA's test split for the MVTec row. The epoch with the
# lowest training loss (feclip_best.pth, the fork's choice) is evaluated; PRO is AnomalyCLIP's
# 200-step variant, as the paper follows AnomalyCLIP.
# Settings: common.sh, and
#   MVTEC_TESTS  data sets the MVTec-trained model is tested on (empty: that model is not trained)
#   VISA_TESTS   data sets the VisA-trained model is tested on (empty: that model is not trained)
source "$(dirname "$0")/common.sh"

SEED="${SEED:-42}"
MVTEC_TESTS="${MVTEC_TESTS-VisA MPDD BTAD DAGM DTD-Synthetic Colon_clinicDB Colon_Kvasir BrainMRI Br35H}"
VISA_TESTS="${VISA_TESTS-MVTec}"

feclip_direction() {
    local train="$1"
    shift
    local run="$OUT/feclip_zero-shot_from_$train"
    data_flags "$train"
    "$PYTHON" train.py --model feclip "${DATA[@]}" "${BACKBONE[@]}" --training_mode full_shot \
        --seed "$SEED" --save_path "$run" "${TRAIN_EXTRA[@]}"
    write_manifest "$run" feclip zero-shot "$train" "$SEED" feclip_best.pth anomalyclip
    local test
    for test in "$@"; do
        evaluate "$run" "$run" "$test" --pro_variant anomalyclip   # the run's kept epoch
    done
}

if test_sets MVTEC_TESTS MVTec; then feclip_direction MVTec "${TESTS[@]}"; fi
if test_sets VISA_TESTS VisA; then feclip_direction VisA "${TESTS[@]}"; fi
