#!/usr/bin/env bash
# 4 processes on this machine, started by dd-train itself (gloo on CPU, one GPU each):
#
#   dd-train --nproc 4 ...
#
# Usage, from the repository root: bash launch/local.sh [DD_TRAIN_ARG...]
# The arguments follow a tiny CPU default (2 sub-nets of a ResNet20, synthetic data, one
# epoch per phase), so later flags win: e.g. --dataset cifar10 --device cuda --subnet-epochs 160.
# A --preset or --config replaces the default (any flag given beats a preset's values).
set -euo pipefail
command -v dd-train >/dev/null || PATH=$(dirname "$0")/../.venv/bin:$PATH  # the repository's venv
command -v dd-train >/dev/null ||  # (else: "exec: dd-train: not found", and no fix)
    { echo "$0: error: dd-train is not on PATH: pip install -e . in a venv, or activate it" >&2; exit 2; }
tiny=(--device cpu --dataset synthetic --arch resnet20 --width 2 --subnets 2 --strategy dd
      --subnet-epochs 1 --finetune-epochs 1 --baseline-epochs 0 --train-samples 512 --test-samples 256)
for arg in "$@"; do case $arg in --preset | --preset=* | --config | --config=*) tiny=() ;; esac; done
exec dd-train --nproc 4 ${tiny[@]+"${tiny[@]}"} "$@"
