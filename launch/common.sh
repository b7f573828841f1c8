# shellcheck shell=bash
# Sourced by the launch scripts in launch/ (never run itself): what they share.
#
#   need_tools ADVICE TOOL...   exit 2 with one line naming the first TOOL not on PATH, and ADVICE
#   tiny_default ARG...         set the array tiny to the scripts' tiny CPU default, or to ()
#                               when ARGs hold a --preset or --config
#   check_flags NPROC ARG...    `dd-train ARG... --nproc NPROC --print-config`, quietly; exit with its code on a refusal

# dd-train not on PATH: the repository's venv (.venv beside launch/), if there is one
command -v dd-train >/dev/null || PATH=$(dirname "${BASH_SOURCE[0]}")/../.venv/bin:$PATH

need_tools() {
    local advice=$1 tool
    shift
    for tool in "$@"; do  # (else: "exec: TOOL: not found", and no fix)
        command -v "$tool" >/dev/null || { echo "$0: error: $tool is not on PATH: $advice" >&2; exit 2; }
    done
}

# shellcheck disable=SC2034  # tiny is read by the scripts that source this file
tiny_default() {
    local arg
    tiny=(--device cpu --dataset synthetic --arch resnet20 --width 2 --subnets 2 --strategy dd
          --subnet-epochs 1 --finetune-epochs 1 --baseline-epochs 0 --train-samples 512 --test-samples 256)
    # flags given beat a preset's values wherever they stand: tiny's would beat the preset's
    for arg in "$@"; do case $arg in --preset | --preset=* | --config | --config=*) tiny=() ;; esac; done
}

# For launchers that stop every rank when one exits (torchrun, horovodrun): checked once first,
# or each rank would say a bad flag's line, under the launcher's own traceback and exit status.
check_flags() {  # check_flags NPROC ARG...: the flags, and the layout of the job on NPROC ranks
    local nproc=$1
    shift
    dd-train "$@" --nproc "$nproc" --print-config >/dev/null || exit  # (it said why)
}
