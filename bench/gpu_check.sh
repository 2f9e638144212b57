#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (no network there; carry .whl, see README.md here).
#   bash bench/gpu_check.sh          # CUDA checks, test throughput (bf16, batch 16/32, 2162 images), forward
#                                    # profile: ~4 min incl. data
#   bash bench/gpu_check.sh full     # training (15 epochs x 2162 images) + fp32/bf16 tests: ~7 min on an H200
# Results land in $OUT (the device tool's output folder) or bench/results. Nothing here leaves the
# repository except $OUT: carried wheels install into .whl/site.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import open_clip" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "open_clip is missing and no .whl/ wheels were carried" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl
  export PYTHONPATH=$PWD/.whl/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
dest=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
# the CUDA-only checks (seconds): no device waits in the test loop, GPU normalisation and smoothing
# parity, CUDA metrics == CPU metrics; not the test suite
if python3 -c "import pytest" 2>/dev/null; then
  python3 -m pytest -q -p no:cacheprovider tests/test_evaluation_loop.py tests/test_metrics.py -k cuda || true
else
  echo "pytest not installed here: CUDA checks not run"
fi
# each step runs even if an earlier one failed: the device time is spent either way
status=0
run() { "$@" || { echo "FAILED ($?): $*" >&2; status=1; }; }
# loader handover with 2 workers, half the cores and all but two (2 8 14 on 16 cores)
cores=$(nproc)
workers=$(printf '%s\n' 2 $((cores / 2)) $((cores - 2)) | awk '$1 >= 1' | sort -nu | tr '\n' ' ')
# shellcheck disable=SC2086  # $workers is a list of numbers
run python3 -m bench.loader_handover --workers $workers --json "$dest/loader_handover_gpu_host.json"
if [ "${1:-}" = full ]; then
  run python3 -m bench.pipeline --device cuda --json "$dest/pipeline_gpu.json"
else
  # a VisA-sized test set (2162 images, VisA's test split), so start-up is paid once as in a real run;
  # the table also shows the start-up seconds and the rate after it
  run python3 -m bench.pipeline --device cuda --skip_train --test_images 2162 --test_batches 16 32 \
      --precisions bf16 --json "$dest/pipeline_gpu_test.json"
fi
# the forward alone: throughput by batch, host enqueue vs device time, the operators taking the time
run python3 -m bench.profile_forward --device cuda --json "$dest/profile_forward_gpu.json"
exit $status
