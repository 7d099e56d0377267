#!/usr/bin/env bash
# One lent GPU, one script, one Markdown table (runs/device/device.md), meant for under 8 minutes:
# the CUDA tests, throughput + peak memory + MFU of the four models at their paper resolution in
# fp32 and bf16 at batch 1, 8, 32, one training step per model (benchmarks/device.py), and
# test.py's whole path on the generated MVTec-sized set (benchmarks/evaluate.py).
#
#   bash benchmarks/device.sh                                  # on the GPU machine
#   bash benchmarks/device.sh --device cpu --model_name tiny   # the check on a CPU
#
# Flags go to benchmarks/device.py; --device and --model_name also to benchmarks/evaluate.py.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
device=auto model=ViT-L-14-336
arguments=("$@")
for ((i = 0; i < ${#arguments[@]}; i++)); do
    case ${arguments[i]} in
        --device) device=${arguments[i + 1]} ;;
        --model_name) model=${arguments[i + 1]} ;;
    esac
done
{
    echo "# Device run $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo '```'
    "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py 2>&1 | tail -3
    echo '```'
    echo
    "$PYTHON" benchmarks/device.py "$@"
    echo
    "$PYTHON" benchmarks/evaluate.py --device "$device" --model_name "$model" 2>/dev/null \
        | sed -n '/^Evaluation path/,$p'
} | tee "$OUT/device.md.tmp"
mv "$OUT/device.md.tmp" "$OUT/device.md"
echo "wrote $OUT/device.md"
