#!/usr/bin/env bash
# 4 processes under Horovod (Gloo controller; build it with launch/build_horovod.sh),
# gradients reduced by Horovod process sets instead of torch.distributed:
#
#   horovodrun --gloo -np 4 -H localhost:4 dd-train --backend horovod ...
#
# Usage, from the repository root: bash launch/horovodrun.sh [DD_TRAIN_ARG...]
# The arguments follow a tiny CPU default (2 sub-nets of a ResNet20, synthetic data, one
# epoch per phase), so later flags win: e.g. --dataset cifar10 --device cuda --subnet-epochs 160.
# A --preset or --config replaces the default (any flag given beats a preset's values).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"  # the venv fallback, need_tools, tiny_default, check_flags
need_tools "pip install -e . in a venv, then bash launch/build_horovod.sh" dd-train horovodrun
tiny_default "$@"
check_flags 4 --backend horovod ${tiny[@]+"${tiny[@]}"} "$@"  # horovodrun stops every rank when one exits
exec horovodrun --gloo -np 4 -H localhost:4 dd-train --backend horovod ${tiny[@]+"${tiny[@]}"} "$@"
