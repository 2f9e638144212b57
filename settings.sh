# Shared by train.sh and test.sh: the paper's four settings (docs/design.md §8) and the dataset folders.
# Sourced, not run. Edit the folder names here if your datasets live elsewhere under DATA_ROOT.

# dataset name (--dataset) -> folder under DATA_ROOT (holding that dataset's meta.json)
declare -A DATASET_DIR=(
  [mvtec]=mvtec [visa]=visa [mpdd]=mpdd [btad]=btad [SDD]=SDD [DTD]=DTD
  [headct]=HeadCT [brain_mri]=BrainMRI [br35h]=Br35H [ISIC]=ISIC
  [colondb]=ColonDB [clinicdb]=ClinicDB [kvasir]=Kvasir [endo]=Endo [tn3k]=TN3K
)

ALL_SETTINGS="visa2mvtec mvtec2industrial colondb2clinicdb clinicdb2medical"

# setting -> "train_dataset|test datasets|n_ctx ab_ctx depth t_n_ctx|alphas"
declare -A SETTING=(
  [visa2mvtec]="visa|mvtec|13 13 9 4|1.0 0.0"
  [mvtec2industrial]="mvtec|visa mpdd btad SDD DTD|12 13 10 2|1.0 0.0 0.1 0.01"
  [colondb2clinicdb]="colondb|clinicdb|12 12 12 4|1.0 0.0"
  [clinicdb2medical]="clinicdb|headct brain_mri br35h ISIC colondb kvasir endo tn3k|12 12 9 4|1.0 0.0 0.1 0.01"
)

# Common protocol: features 6 12 18 24, image 518, batch 8, dpam 20, seed 111, sigma 8, epoch 15.
COMMON_FLAGS="--features_list 6 12 18 24 --image_size 518 --dpam 20"

setting_field() {  # setting_field SETTING INDEX(1..4)
  local spec=${SETTING[$1]:-}
  if [ -z "$spec" ]; then
    echo "unknown setting '$1'; choose from: $ALL_SETTINGS" >&2
    return 1
  fi
  echo "$spec" | cut -d'|' -f"$2"
}

prompt_flags() {  # prompt_flags SETTING
  read -r n a d t <<<"$(setting_field "$1" 3)"
  echo "--n_ctx $n --ab_ctx $a --depth $d --t_n_ctx $t"
}

dataset_root() {  # dataset_root NAME -> path, or nothing (and a message) if its folder is missing
  local dir="$DATA_ROOT/${DATASET_DIR[$1]}"
  if [ ! -f "$dir/meta.json" ]; then
    echo "skip $1: no $dir/meta.json (prepare it with generate_dataset_json/, see docs/datasets.md)" >&2
    return 1
  fi
  echo "$dir"
}
