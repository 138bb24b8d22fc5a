#!/usr/bin/env bash
# Train a standard DML benchmark with the paper's protocol (ResNet-50, frozen BatchNorm, D = 512, 224 px,
# batch 56 classes x 2, Adam 1e-5, weight decay 4e-4, multi-similarity) plus the cross-image-attention head.
#
#   scripts/launch/train_benchmark.sh cub200  /data/CUB_200_2011            # one GPU
#   GPUS=8 scripts/launch/train_benchmark.sh sop /data/Stanford_Online_Products   # one machine, 8 GPUs
#   CONFIG=scripts/launch/accelerate_multi_node.yaml MACHINE_RANK=0 scripts/launch/train_benchmark.sh inshop /data/inshop
#
# ImageNet weights for ResNet-50 come from the Hub (recipe field pretrained: timm), so this needs a network.
# Add --cia_levels 0 for the baseline. Batch 112 is per process: with several GPUs the base loss sees all of them
# (all-gather); keep the global batch at 112 with --batch_size $((112 / GPUS)) if you want the paper's setting.
#
# For comparison, Recall@1 of multi-similarity in the literature (Wang et al., CVPR 2019, BN-Inception, D = 512):
#   cub200 65.7   cars196 84.1   sop 78.2   inshop 89.7
# (the CIA paper's own figures are not quoted here: its full text was not available to us).
set -euo pipefail
RECIPE=${1:?recipe: cub200, cars196, sop or inshop}
DATA_DIR=${2:?path to the local copy of the dataset}
shift 2
GPUS=${GPUS:-1}
if [[ -n "${CONFIG:-}" ]]; then
  LAUNCH=(accelerate launch --config_file "$CONFIG" --machine_rank "${MACHINE_RANK:-0}")
elif [[ "$GPUS" -gt 1 ]]; then
  LAUNCH=(accelerate launch --multi_gpu --num_processes "$GPUS" --mixed_precision bf16)
else
  LAUNCH=(accelerate launch --num_processes 1 --mixed_precision bf16)
fi
exec "${LAUNCH[@]}" -m crossmetric.cli train --config "$RECIPE" --data_dir "$DATA_DIR" \
  --mixed_precision bf16 --num_workers 8 --output_dir outputs --run_name "$RECIPE-r50-cia" "$@"
