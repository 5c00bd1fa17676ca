#!/usr/bin/env bash
# Submit a slurm/*.sh job after checking, here and now, what the job would check after its queue wait:
#
#   bash slurm/submit.sh slurm/train_mosi.sh [sbatch options ...]
#   FD_OVERRIDES="run.dir=runs/mosi-lr3 train.lr=3e-4" bash slurm/submit.sh slurm/train_mosi.sh --nodes=4
#
# It loads the config the job will use (FD_CONFIG, else the script's default, with FD_OVERRIDES), checks its
# batch geometry for the number of ranks the job will get (nodes x ranks per node, from the sbatch options
# given here, else the script's #SBATCH lines), creates logs/ (sbatch does not, and a job whose log directory
# is missing fails without a word), then runs sbatch.
set -euo pipefail
[ $# -ge 1 ] && [ -f "$1" ] || { echo "usage: bash slurm/submit.sh slurm/SCRIPT.sh [sbatch options ...]" >&2; exit 2; }
script=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# the script's own default for a setting, from its ': "${NAME:=value}"' line
default_of() { sed -n "s/^: \"\\\${$1:=\\(.*\\)}\".*/\\1/p" "$script"; }
config=${FD_CONFIG:-$(default_of FD_CONFIG)}
read -r -a overrides <<< "${FD_OVERRIDES-$(default_of FD_OVERRIDES)}"
source "$here/../launch/_lib.sh"
fd_activate_venv
world=$(python "$here/jobtools.py" world "$script" "$@") || exit 2
python "$here/jobtools.py" check --world-size "$world" "$config" "${overrides[@]}" > /dev/null || exit 2
echo "fusion-dist submit: $config checked for $world ranks"
mkdir -p logs
exec sbatch "$@" "$script"
