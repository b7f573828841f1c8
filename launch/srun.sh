#!/usr/bin/env bash
# One rank per Slurm task: all tasks of the allocation (salloc, or a batch script; slurm/ has
# complete job scripts with requeueing), or 4 tasks of a new one when run outside. pmi2
# gives pip's MPICH one MPI world (PMIx does not):
#
#   salloc -n 8 bash launch/srun.sh ...   ->   srun --mpi=pmi2 dd-train ...
#
# Usage, from the repository root: bash launch/srun.sh [DD_TRAIN_ARG...]
# The arguments follow a tiny CPU default (2 sub-nets of a ResNet20, synthetic data, one
# epoch per phase), so later flags win: e.g. --dataset cifar10 --device cuda --subnet-epochs 160.
# A --preset or --config replaces the default (any flag given beats a preset's values).
set -euo pipefail
command -v dd-train >/dev/null || PATH=$(dirname "$0")/../.venv/bin:$PATH  # the repository's venv
for tool in dd-train srun; do  # (else: "exec: srun: not found", and no fix)
    command -v "$tool" >/dev/null || { echo "$0: error: $tool is not on PATH: run it on a Slurm cluster, with dd_mpi installed (pip install -e '.[mpi]')" >&2; exit 2; }
done
tiny=(--device cpu --dataset synthetic --arch resnet20 --width 2 --subnets 2 --strategy dd
      --subnet-epochs 1 --finetune-epochs 1 --baseline-epochs 0 --train-samples 512 --test-samples 256)
for arg in "$@"; do case $arg in --preset | --preset=* | --config | --config=*) tiny=() ;; esac; done
exec srun --ntasks="${SLURM_NTASKS:-4}" --mpi=pmi2 --kill-on-bad-exit=1 dd-train ${tiny[@]+"${tiny[@]}"} "$@"
