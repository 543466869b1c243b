#!/usr/bin/env bash
# The model-soup study behind results/soup.md (Wortsman et al. 2022, on a CPU budget): one LeNet-5 pretrained on
# a 12,000-digit MNIST subset (the classify ci config), then five fine-tunes of it on the full training set that
# differ in seed, learning rate, augmentation and label smoothing; all share the pretrained initialisation and
# keep its head (train.reset_head=false), as soups require. Then best single, ensemble, uniform and greedy soup,
# ranked on the validation split. About 6 minutes on an idle 2-core CPU.
#   bash scripts/soup_study.sh [RUN_DIR]        (default runs/soup; results go to results/soup.md)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
out=${1:-runs/soup}
export CNNAPPS_DATA="${CNNAPPS_DATA:-$(cd .. && pwd)/shared/data}"
$py -m cnnapps.tasks.classify train --config ci --out "$out/base" --quiet
common=(--config mnist_lenet5 --quiet --set train.epochs=2 --set train.warmup_epochs=0
        --set "train.init_checkpoint=$out/base/checkpoints/best.pt" --set train.reset_head=false)
variants=("seed=1 lr=0.01 aug=true ls=0.0"
          "seed=2 lr=0.02 aug=true ls=0.0"
          "seed=3 lr=0.005 aug=false ls=0.0"
          "seed=4 lr=0.01 aug=true ls=0.1"
          "seed=5 lr=0.03 aug=false ls=0.1")
ckpts=()
for v in "${variants[@]}"; do
  eval "$v"  # sets seed, lr, aug, ls
  name="ft_s${seed}_lr${lr}_aug${aug}_ls${ls}"
  $py -m cnnapps.tasks.classify train "${common[@]}" --out "$out/$name" --set "train.seed=$seed" \
      --set "train.lr=$lr" --set "data.augment=$aug" --set "train.label_smoothing=$ls"
  ckpts+=("$out/$name/checkpoints/best.pt")
done
$py -m cnnapps soup --task classify --greedy "${ckpts[@]}"
