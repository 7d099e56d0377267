# Sourced by aaclip_*.sh: AA-CLIP's cross-data-set protocol (the paper's Tables 1-2; the authors'
# answers in Mwxinnn/AA-CLIP issues #3, #6, #8 and #27).
#
# Train on VisA, test on the ten other data sets; train on MVTec, test on VisA (the paper's VisA
# row). SHOT is the training data set's shots per class (k/2 normal, k/2 anomalous) or "full"
# (its whole test split, the original's full-shot files). The evaluated checkpoint is pinned as
# the published runs used it: epoch 15 for full shot (the authors' released log), epoch 20 (the
# last) for few shot. Seed 111, the original's default. Extra settings:
#   EPOCH        evaluated epoch (default: 15 full shot, 20 few shot)
#   VISA_TESTS   data sets the VisA-trained model is tested on (empty: that model is not trained)
#   MVTEC_TESTS  data sets the MVTec-trained model is tested on (empty: that model is not trained)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SEED="${SEED:-111}"
VISA_TESTS="${VISA_TESTS-MVTec BTAD MPDD Brain Liver Retina Colon_clinicDB Colon_colonDB Colon_cvc300 Colon_Kvasir}"
MVTEC_TESTS="${MVTEC_TESTS-VisA}"

# aaclip_direction SHOT TRAIN TESTS...: train on TRAIN, evaluate the pinned epoch on each test set.
aaclip_direction() {
    local shot="$1" train="$2"
    shift 2
    local shot_flags epoch setting
    if [ "$shot" = full ]; then
        shot_flags=(--training_mode full_shot)
        epoch="${EPOCH:-15}"
        setting=full
    else
        shot_flags=(--training_mode few_shot --shot "$shot")
        epoch="${EPOCH:-20}"
        setting="$shot-shot"
    fi
    local run="$OUT/aaclip_${setting}_from_$train"
    data_flags "$train"
    "$PYTHON" train.py --model aaclip "${DATA[@]}" "${BACKBONE[@]}" "${shot_flags[@]}" \
        --seed "$SEED" --save_path "$run" "${TRAIN_EXTRA[@]}"
    write_manifest "$run" aaclip "$setting" "$train" "$SEED" "image_adapter_$epoch.pth" exact
    local test
    for test in "$@"; do
        evaluate "$run" "$run/image_adapter_$epoch.pth" "$test"
    done
}

# aaclip_tables SHOT: both directions of the paper's tables at SHOT.
aaclip_tables() {
    local shot="$1"
    if test_sets VISA_TESTS VisA; then aaclip_direction "$shot" VisA "${TESTS[@]}"; fi
    if test_sets MVTEC_TESTS MVTec; then aaclip_direction "$shot" MVTec "${TESTS[@]}"; fi
}
