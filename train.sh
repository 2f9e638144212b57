#!/usr/bin/env bash
# Train GlocalCLIP prompts for the paper's settings (docs/design.md §8).
#   bash train.sh                      # every setting
#   bash train.sh visa2mvtec           # one (or several) by name
# Then: bash test.sh [SETTING...]
set -uo pipefail

DATA_ROOT=${DATA_ROOT:-./data}          # holds mvtec/, visa/, ..., each with its meta.json
OUT_ROOT=${OUT_ROOT:-./runs}            # checkpoints: OUT_ROOT/SETTING/alpha_A/checkpoints/epoch_N.pth
GPU=${GPU:-0}                           # which GPU (CUDA_VISIBLE_DEVICES)
EPOCHS=${EPOCHS:-15}
SEED=${SEED:-111}
PYTHON=${PYTHON:-python3}
EXTRA_TRAIN_FLAGS=${EXTRA_TRAIN_FLAGS:-}  # e.g. "--pretrained /path/ViT-L-14-336px.pt --precision bf16"
ALPHAS=${ALPHAS:-}                        # override the setting's alpha sweep, e.g. "1.0"

cd "$(dirname "$0")"
source ./settings.sh
export CUDA_VISIBLE_DEVICES=$GPU

settings=${*:-$ALL_SETTINGS}
failed=0
for s in $settings; do
  train_ds=$(setting_field "$s" 1) || exit 2
  alphas=${ALPHAS:-$(setting_field "$s" 4)}
  root=$(dataset_root "$train_ds") || { failed=1; continue; }
  for alpha in $alphas; do
    out="$OUT_ROOT/$s/alpha_$alpha"
    echo "== $s: train on $train_ds, alpha $alpha -> $out"
    # a run begun before continues (a finished one has nothing to do); pass --overwrite in
    # EXTRA_TRAIN_FLAGS to train it afresh
    resume=()
    if [[ " $EXTRA_TRAIN_FLAGS " != *" --overwrite "* ]] && compgen -G "$out/checkpoints/epoch_*.pth" >/dev/null; then
      resume=(--resume "$out/checkpoints")
    fi
    # shellcheck disable=SC2046,SC2086
    $PYTHON train.py --train_data_path "$root" --dataset "$train_ds" --save_path "$out/checkpoints" ${resume[@]+"${resume[@]}"} \
      --epoch "$EPOCHS" --batch_size 8 --learning_rate 0.001 --seed "$SEED" --alpha "$alpha" \
      $COMMON_FLAGS $(prompt_flags "$s") $EXTRA_TRAIN_FLAGS || { echo "!! training $s alpha $alpha failed"; failed=1; }
  done
done
exit $failed
