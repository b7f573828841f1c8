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
command -v dd-train >/dev/null || PATH=$(dirname "$0")/../.venv/bin:$PATH  # the repository's venv
for tool in dd-train horovodrun; do  # (else: "exec: horovodrun: not found", and no fix)
    command -v "$tool" >/dev/null || { echo "$0: error: $tool is not on PATH: pip install -e . in a venv, then bash launch/build_horovod.sh" >&2; exit 2; }
done
tiny=(--device cpu --dataset synthetic --arch resnet20 --width 2 --subnets 2 --strategy dd
      --subnet-epochs 1 --finetune-epochs 1 --baseline-epochs 0 --train-samples 512 --test-samples 256)
for arg in "$@"; do case $arg in --preset | --preset=* | --config | --config=*) tiny=() ;; esac; done
# checked once first: horovodrun stops every rank when one exits, so each would say a bad flag's line,
# under the launcher's own traceback and exit status
dd-train --backend horovod ${tiny[@]+"${tiny[@]}"} "$@" --print-config >/dev/null || exit  # (it said why)
exec horovodrun --gloo -np 4 -H localhost:4 dd-train --backend horovod ${tiny[@]+"${tiny[@]}"} "$@"
