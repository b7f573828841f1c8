#!/usr/bin/env bash
# 4 processes on this machine under torchrun (rendezvous from its environment):
#
#   torchrun --standalone --nproc-per-node 4 -m dd_mpi ...
#
# On several nodes: --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT instead of --standalone.
#
# Usage, from the repository root: bash launch/torchrun.sh [DD_TRAIN_ARG...]
# The arguments follow a tiny CPU default (2 sub-nets of a ResNet20, synthetic data, one
# epoch per phase), so later flags win: e.g. --dataset cifar10 --device cuda --subnet-epochs 160.
# A --preset or --config replaces the default (any flag given beats a preset's values).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"  # the venv fallback, need_tools, tiny_default, check_flags
need_tools "pip install -e . in a venv, or activate it" dd-train torchrun
tiny_default "$@"
check_flags 4 ${tiny[@]+"${tiny[@]}"} "$@"  # torchrun stops every rank when one exits
exec torchrun --standalone --nproc-per-node 4 -m dd_mpi ${tiny[@]+"${tiny[@]}"} "$@"
