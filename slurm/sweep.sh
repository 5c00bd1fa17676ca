#!/usr/bin/env bash
# A set of configurations (a grid, or a paper study's settings) as one Slurm job array, then a report over all of it:
#
#   bash slurm/sweep.sh slurm/sweeps/mosi_depth.yaml [sbatch options for the array tasks ...]
#
# The sweep file (format: fusion_dist/study.py) names the job script, the config, the settings and/or grid and
# an MLflow experiment (configs/studies/ holds the paper's studies). Every array task trains one configuration
# (all its seeds) in <dir>/task<i>, logs to logs/<name>-<arrayid>_<i>.out and tracks into the one experiment
# (<dir>/mlflow.db, or the server in $MLFLOW_TRACKING_URI). A last job, started only when every task has
# succeeded (afterok), runs `fusion-dist compare --study` over the experiment: its tables (also the paper-style
# one: a row per setting, the paper's numbers beside ours) in logs/<name>-report-<jobid>.out and a plot in
# <dir>/compare.png, both also logged to MLflow. Tasks are requeued after preemption like any job.
# Limit how many tasks run at once with FD_SWEEP_MAX_PARALLEL (sbatch --array=...%N).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: bash slurm/sweep.sh SWEEP.yaml [sbatch options ...]" >&2; exit 2; }
sweep_file=$1; shift
# absolute, for the report job (jobtools names a missing file)
[ -f "$sweep_file" ] && sweep_file=$(cd "$(dirname "$sweep_file")" && pwd)/$(basename "$sweep_file")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/../launch/_lib.sh"
fd_activate_venv

# expands the grid into <dir>/tasks.tsv, checks every task's config, creates the experiment; sets
# tasks dir script config experiment uri name
plan=$(python "$here/jobtools.py" sweep "$sweep_file" "$@")
eval "$plan"
mkdir -p logs
limit=${FD_SWEEP_MAX_PARALLEL:+%$FD_SWEEP_MAX_PARALLEL}
array=$(FD_SWEEP_TASKS="$dir/tasks.tsv" FD_CONFIG="$config" sbatch --parsable --array="0-$((tasks - 1))$limit" \
  --job-name="$name" --output="logs/%x-%A_%a.out" "$@" "$script")
array=${array%%;*}
report=$(sbatch --parsable --dependency="afterok:$array" --kill-on-invalid-dep=yes --job-name="$name-report" \
  --nodes=1 --ntasks=1 --time=00:30:00 --output="logs/%x-%j.out" \
  --wrap="$(printf '%q ' fusion-dist compare "$experiment" --uri "$uri" --out "$dir/compare.png" --study "$sweep_file")")
echo "sweep $name: $tasks tasks = array job $array (logs/$name-${array}_<i>.out), report job $report after all succeed"
echo "runs in $dir/task<i>; MLflow experiment '$experiment' at $uri"
echo "array=$array report=$report"
