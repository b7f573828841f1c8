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
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"  # the venv fallback, need_tools, tiny_default, check_flags
need_tools "run it on a Slurm cluster, with dd_mpi installed (pip install -e '.[mpi]')" dd-train srun
tiny_default "$@"
exec srun --ntasks="${SLURM_NTASKS:-4}" --mpi=pmi2 --kill-on-bad-exit=1 dd-train ${tiny[@]+"${tiny[@]}"} "$@"
