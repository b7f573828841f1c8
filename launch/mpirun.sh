#!/usr/bin/env bash
# 4 MPI processes (pip's MPICH: pip install "dd_mpi[mpi]"; any MPI with mpi4py works).
# The ranks agree on the torch.distributed address over MPI:
#
#   mpiexec -n 4 dd-train ...
#
# Usage, from the repository root: bash launch/mpirun.sh [DD_TRAIN_ARG...]
# The arguments follow a tiny CPU default (2 sub-nets of a ResNet20, synthetic data, one
# epoch per phase), so later flags win: e.g. --dataset cifar10 --device cuda --subnet-epochs 160.
# A --preset or --config replaces the default (any flag given beats a preset's values).
set -euo pipefail
command -v dd-train >/dev/null || PATH=$(dirname "$0")/../.venv/bin:$PATH  # the repository's venv
for tool in dd-train mpiexec; do  # (else: "exec: mpiexec: not found", and no fix)
    command -v "$tool" >/dev/null || { echo "$0: error: $tool is not on PATH: pip install -e '.[mpi]' in a venv (pip's MPICH), or activate it" >&2; exit 2; }
done
tiny=(--device cpu --dataset synthetic --arch resnet20 --width 2 --subnets 2 --strategy dd
      --subnet-epochs 1 --finetune-epochs 1 --baseline-epochs 0 --train-samples 512 --test-samples 256)
for arg in "$@"; do case $arg in --preset | --preset=* | --config | --config=*) tiny=() ;; esac; done
exec mpiexec -n 4 dd-train ${tiny[@]+"${tiny[@]}"} "$@"
