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
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"  # the venv fallback, need_tools, tiny_default, check_flags
need_tools "pip install -e '.[mpi]' in a venv (pip's MPICH), or activate it" dd-train mpiexec
tiny_default "$@"
exec mpiexec -n 4 dd-train ${tiny[@]+"${tiny[@]}"} "$@"
