#!/usr/bin/env bash
# Zero-shot tests of the checkpoints train.sh wrote, then one summary table beside the paper.
#   bash test.sh                       # every setting that was trained
#   bash test.sh mvtec2industrial      # one (or several) by name
set -uo pipefail

DATA_ROOT=${DATA_ROOT:-./data}
OUT_ROOT=${OUT_ROOT:-./runs}
GPU=${GPU:-0}
EPOCHS=${EPOCHS:-15}                    # which epoch's checkpoint to test
SIGMA=${SIGMA:-8}
PYTHON=${PYTHON:-python3}
EXTRA_TEST_FLAGS=${EXTRA_TEST_FLAGS:-}  # e.g. "--batch_size 32 --precision bf16"
ALPHAS=${ALPHAS:-}

cd "$(dirname "$0")"
source ./settings.sh
export CUDA_VISIBLE_DEVICES=$GPU

settings=${*:-$ALL_SETTINGS}
ran=()
for s in $settings; do
  setting_field "$s" 1 >/dev/null || exit 2
  alphas=${ALPHAS:-$(setting_field "$s" 4)}
  for alpha in $alphas; do
    ckpt="$OUT_ROOT/$s/alpha_$alpha/checkpoints/epoch_$EPOCHS.pth"
    if [ ! -f "$ckpt" ]; then
      echo "skip $s alpha $alpha: no checkpoint $ckpt (run train.sh $s first)" >&2
      continue
    fi
    for ds in $(setting_field "$s" 2); do
      root=$(dataset_root "$ds") || continue
      out="$OUT_ROOT/$s/alpha_$alpha/test/$ds"
      echo "== $s alpha $alpha: test on $ds -> $out"
      # shellcheck disable=SC2086
      if $PYTHON test.py --data_path "$root" --dataset "$ds" --checkpoint_path "$ckpt" --save_path "$out" \
           --sigma "$SIGMA" $EXTRA_TEST_FLAGS; then
        ran+=("$out")
      else
        echo "!! test $s alpha $alpha on $ds failed"
      fi
    done
  done
done

if [ ${#ran[@]} -eq 0 ]; then
  echo "nothing was tested" >&2
  exit 1
fi
echo
echo "== summary of ${#ran[@]} test runs (paper numbers beside yours) -> $OUT_ROOT/summary.md"
$PYTHON -m glocalclip report "${ran[@]}" --out "$OUT_ROOT/summary.md"
