#!/usr/bin/env bash
# Run the authors' own Dataset Distillation code (github.com/SsnL/dataset-distillation) on the setting
# of configs/02/paper_fixed_init.yaml: MNIST, LeNet, one fixed init, 10 images, 1 step x 3 epochs,
# 400 epochs (the fixed-init command of its README), on CPU. This is the yardstick for notebook 02's
# paper-scale number: same machine, same PyTorch, the authors' implementation.
#
#   benchmarks/official_dd_fixed_init.sh SEED [DATA_ROOT] [CHECKOUT]
#
# SEED is the official --base_seed (it picks the network init and the distilled pixels' start).
# DATA_ROOT holds MNIST/raw/ (default: $DDLIB_DATA, else ./data). CHECKOUT is a clone of the official
# repository (default: .official/dataset-distillation, cloned when missing; needs the network once).
# About 52-56 min per seed on 2 cores (0.13-0.14 s per outer iteration). Its output files go to
# CHECKOUT/results_seed$SEED/, its log to CHECKOUT/results_seed$SEED.log; the last two lines printed
# are its test accuracy before and after the steps.
# EPOCHS=1 makes a one-minute smoke run.
set -euo pipefail

seed=${1:?"usage: $0 SEED [DATA_ROOT] [CHECKOUT]"}
data_root=$(realpath -m "${2:-${DDLIB_DATA:-data}}")
checkout=${3:-.official/dataset-distillation}
python=$(realpath -s "${PYTHON:-.venv/bin/python}")   # -s: keep the venv symlink
commit=24e6958cf23bc98de20a7b2714fc76fa7d38b874   # the repository's last commit (March 2020), the one measured

[ -d "$data_root/MNIST/raw" ] || { echo "error: no MNIST/raw/ under $data_root (pass DATA_ROOT or set DDLIB_DATA)" >&2; exit 1; }
if [ ! -d "$checkout" ]; then
  git clone -q https://github.com/SsnL/dataset-distillation "$checkout"
fi
git -C "$checkout" checkout -q "$commit" -- .
# The one change it needs on PyTorch >= 2.0: zero_grad() now sets .grad to None, and the code adds
# its hand-computed gradients into .grad in place (it was written for PyTorch 1.x, which zeroed it).
sed -i 's/self\.optimizer\.zero_grad()$/self.optimizer.zero_grad(set_to_none=False)/' "$checkout/train_distilled_image.py"

out="results_seed$seed"
rm -rf "$checkout/$out"   # it refuses to reuse an older run's folder on this PyTorch (yaml.load)
cd "$checkout"
"$python" main.py --mode distill_basic --dataset MNIST --arch LeNet \
  --distill_steps 1 --train_nets_type known_init --n_nets 1 --test_nets_type same_as_train \
  --base_seed "$seed" --dataset_root "$data_root" --device_id -1 --num_workers 0 \
  --epochs "${EPOCHS:-400}" --results_dir "./$out/" 2>&1 | tee "$out.log"
echo "full test set, seed $seed: accuracy before the steps, then after the 3 learned steps"
grep -E "before steps|step +3 \(" "$out.log" | tail -n 2
