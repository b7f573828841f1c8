#!/bin/bash
# Food-101: ResNet50 split into 4 narrow ResNet50s, or 8 with --subnets 8 (Gu et al., ETNA
# 2022, §5). Two 4-GPU nodes: 8 ranks, 2 per sub-network (1 with --subnets 8).
#
#   sbatch slurm/food101_resnet50.sh --data-dir /data          # the paper's run
#   sbatch slurm/food101_resnet50.sh --data-dir /data --cache-dir /scratch/$USER/dd-cache  # JPEGs decoded once
#   sbatch slurm/food101_resnet50.sh --data-dir /data --subnets 8
#   sbatch --nodes=1 --gpus-per-node=0 --cpus-per-task=1 slurm/food101_resnet50.sh \
#       --device cpu --dataset synthetic --image-size 64 --subnet-epochs 1 --finetune-epochs 1 \
#       --strategy dd
#
# Arguments after the script name are passed to dd-train after the preset: later flags win.
# Writes runs/food101_resnet50-JOBID/ (report.json, metrics.jsonl, checkpoints/) unless --out is
# given, and the log food101_resnet50-JOBID.out, both where sbatch was called.
#SBATCH --job-name=food101_resnet50
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4      # one rank per GPU
#SBATCH --gpus-per-node=4        # all the node's GPUs visible to every rank (NCCL peer-to-peer);
#                                  a rank takes its local rank's. No GPUs: sbatch --gpus-per-node=0
#SBATCH --cpus-per-task=8        # data-loader workers and host threads per rank
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append       # a requeued run appends to its log instead of erasing it
#SBATCH --requeue
#SBATCH --signal=B:USR1@120      # B: to the batch shell only, which forwards it to srun's
#                                  ranks and requeues the job when they exit 75 (common.sh)
set -eu
# sbatch runs a spooled copy of this file: find common.sh beside the submitted script
submitted=$(scontrol show job "$SLURM_JOB_ID" | awk 'sub(/^ *Command=/, "") {print; exit}')  # script, args
while [[ $submitted == *" "* && ! -f $submitted ]]; do submitted=${submitted% *}; done  # its path may hold spaces
for dir in "$(dirname "$submitted")" "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-.}/slurm"; do
    [[ -f $dir/common.sh ]] && break
done
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$dir/common.sh"

dd_train --preset food101-resnet50 --out "runs/$SLURM_JOB_NAME-$SLURM_JOB_ID" "$@"
