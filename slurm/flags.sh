# shellcheck shell=bash
# Sourced by slurm/dd_array.sh and slurm/dd_array_submit.sh: a dd-train flag's value as
# dd-train will read it from a command line. Its flags are spelt out whole (no abbreviations:
# dd-train refuses them) and the last one given wins, so a scan for the last one is exact.

last_value() {  # last_value FLAG DEFAULT [ARG...]: the value of FLAG among ARGs, else DEFAULT
    local flag=$1 value=$2
    shift 2
    while (( $# )); do
        case $1 in
            "$flag") if (( $# > 1 )); then value=$2; shift; fi ;;
            "$flag"=*) value=${1#*=} ;;
        esac
        shift
    done
    printf '%s\n' "$value"
}
