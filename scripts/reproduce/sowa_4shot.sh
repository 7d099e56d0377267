#!/usr/bin/env bash
# SOWA 4-shot tables (the original's README): train one epoch on VisA's test split and test on
# MVTec, train on MVTec's test split and test on VisA, BTAD, DAGM and DTD-Synthetic (README Table
# A's rows); at test a memory of K = 4 normal images per class from the test data set's train
# split (drawn with SUPPORT_SEED; the original drew without a seed). AUPRO is SOWA's own variant.
# The README reports mean ± std over runs: repeat with several SEED values and compare with
# scripts/compare_runs.py.
# Settings: common.sh, and
#   K_SHOT        support images per class (default 4)
#   SUPPORT_SEED  seed of the support draw (default 42)
#   VISA_TESTS    data sets the VisA-trained model is tested on (empty: that model is not trained)
#   MVTEC_TESTS   data sets the MVTec-trained model is tested on (empty: that model is not trained)
source "$(dirname "$0")/common.sh"

SEED="${SEED:-2025}"
K_SHOT="${K_SHOT:-4}"
SUPPORT_SEED="${SUPPORT_SEED:-42}"
VISA_TESTS="${VISA_TESTS-MVTec}"
MVTEC_TESTS="${MVTEC_TESTS-VisA BTAD DAGM DTD-Synthetic}"

sowa_direction() {
    local train="$1"
    shift
    local run="$OUT/sowa_${K_SHOT}-shot_from_$train"
    data_flags "$train"
    "$PYTHON" train.py --model sowa "${DATA[@]}" "${BACKBONE[@]}" --training_mode full_shot \
        --seed "$SEED" --save_path "$run" "${TRAIN_EXTRA[@]}"
    write_manifest "$run" sowa "$K_SHOT-shot" "$train" "$SEED" sowa.pth sowa
    local test
    for test in "$@"; do
        evaluate "$run" "$run/sowa.pth" "$test" --pro_variant sowa \
            --k_shot "$K_SHOT" --support_seed "$SUPPORT_SEED"
    done
}

if test_sets VISA_TESTS VisA; then sowa_direction VisA "${TESTS[@]}"; fi
if test_sets MVTEC_TESTS MVTec; then sowa_direction MVTec "${TESTS[@]}"; fi
