# The body of every slurm/*.sh job script: sourced after its #SBATCH headers and FD_* defaults.
#
# Settings (environment at `sbatch` time, which the job inherits, or `sbatch --export=ALL,NAME=value`):
#   FD_CONFIG          config YAML (each script defaults to its paper config)
#   FD_OVERRIDES       key=value overrides, space-separated: "run.dir=runs/mosi-2 train.epochs=5"
#   FD_LAUNCHER        torchrun (default: one task per node, c10d) | deepspeed (one task per node, --no_ssh)
#                      | srun (one task per GPU; allocate --ntasks-per-node = GPUs per node)
#   FD_PROCS_PER_NODE  ranks per node (default: the GPUs Slurm gave each node, or 1 on CPU nodes)
#   FD_MASTER_PORT     rendezvous port on the head node (default: one per job id, fusion_dist.dist.slurm_master_port)
#   FD_VENV            virtualenv to activate (default <checkout>/.venv when present and none is active)
#
# Preemption: `#SBATCH --signal=B:USR1@N` sends SIGUSR1 to this shell N seconds before the time limit.
# The trap forwards it to every rank; the trainer finishes its step, saves a checkpoint and exits with
# PREEMPTED_EXIT; this script then runs `scontrol requeue`, and the requeued job (same job id, same log,
# SLURM_RESTART_COUNT + 1) resumes from that checkpoint into the same MLflow runs. A SIGTERM (scancel,
# time limit, Slurm's own preemption) also makes the trainer save, but is not requeued from here.

set -uo pipefail
PREEMPTED_EXIT=85  # fusion_dist.train.commands.PREEMPTED_EXIT
export PYTHONUNBUFFERED=1  # progress lines reach the job log as they happen

FD_LOG_PREFIX="fusion-dist job ${SLURM_JOB_ID:-}"
source "$FD_HOME/launch/_lib.sh"

[ -n "${SLURM_JOB_ID:-}" ] || fd_die "submit this script with sbatch (see README, 'Running on a cluster')"
FD_LAUNCHER=${FD_LAUNCHER:-torchrun}
case "$FD_LAUNCHER" in torchrun|deepspeed|srun) ;; *) fd_die "FD_LAUNCHER=$FD_LAUNCHER: use torchrun, deepspeed or srun" ;; esac
fd_activate_venv
command -v python >/dev/null || fd_die "no python on PATH (activate the environment that has fusion-dist, or set FD_VENV)"

read -r -a overrides <<< "${FD_OVERRIDES:-}"
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -n "${FD_SWEEP_TASKS:-}" ]; then
  # a sweep task (slurm/sweep.sh): its line of the plan, tab-separated overrides
  IFS=$'\t' read -r -a task <<< "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$FD_SWEEP_TASKS")"
  [ ${#task[@]} -gt 0 ] || fd_die "$FD_SWEEP_TASKS has no line for array task $SLURM_ARRAY_TASK_ID"
  overrides+=("${task[@]}")
fi

# Check the config, and its batch geometry for the ranks this allocation runs, before anything is launched:
# a typo costs seconds, not a crash on every rank.
procs=$(fd_procs_per_node) || exit 2
world=$(( ${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} * procs ))
run_dir=$(python "$FD_HOME/slurm/jobtools.py" check --world-size "$world" "$FD_CONFIG" "${overrides[@]}") || exit 2

restarts=${SLURM_RESTART_COUNT:-0}
fd_log "$FD_COMMAND $FD_CONFIG ${overrides[*]}"
fd_log "nodes $SLURM_JOB_NODELIST ($world ranks), launcher $FD_LAUNCHER, restart count $restarts, run dir $run_dir"
if compgen -G "$run_dir/checkpoints/seed*/latest" >/dev/null; then
  fd_log "checkpoint(s) found: $(cd "$run_dir/checkpoints" && for f in seed*/latest; do printf '%s ' "${f%/latest}:$(cat "$f")"; done)- resuming"
elif [ "$restarts" -gt 0 ]; then
  fd_log "requeued (restart $restarts) but $run_dir has no checkpoint yet: starting fresh"
fi

preempt=0
interrupted=0
on_usr1() {
  interrupted=1
  [ "$preempt" = 1 ] && return
  preempt=1
  fd_log "SIGUSR1 (time limit or preemption ahead): asking the ranks to checkpoint and stop"
  kill -USR1 "$launcher_pid" 2>/dev/null || true
}
on_term() {
  interrupted=1
  fd_log "SIGTERM: the ranks save a checkpoint if they have time; waiting for them"
}
trap on_usr1 USR1
trap on_term TERM

OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-1} / procs ))}
[ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
export OMP_NUM_THREADS
bash "$FD_HOME/launch/srun.sh" "$FD_LAUNCHER" "$FD_COMMAND" "$FD_CONFIG" "${overrides[@]}" &
launcher_pid=$!
# `wait` returns early when a trapped signal arrives; wait again until the launcher itself has ended.
while :; do
  interrupted=0
  rc=0
  wait "$launcher_pid" || rc=$?
  [ "$interrupted" = 1 ] || break
done

if [ "$rc" = 0 ]; then
  fd_log "finished; results in $run_dir (metrics.json, predictions/, export/)"
  exit 0
elif [ "$preempt" = 1 ]; then
  # torchrun reports any non-zero rank exit as its own failure, so the USR1 we forwarded, not the
  # exit code, says this was a preemption; the deepspeed launcher and srun pass PREEMPTED_EXIT through.
  fd_log "ranks stopped after SIGUSR1 (exit $rc): scontrol requeue $SLURM_JOB_ID (restart $((restarts + 1)) will resume from the last checkpoint)"
  scontrol requeue "$SLURM_JOB_ID" || fd_die "scontrol requeue failed; resubmit the same command to resume"
  exit 0
elif [ "$rc" = "$PREEMPTED_EXIT" ]; then
  fd_log "ranks saved a checkpoint and stopped (SIGTERM); resubmit the same command to resume"
  exit "$rc"
fi
fd_log "failed (exit $rc); resubmitting the same command resumes from the last complete checkpoint, if any"
exit "$rc"
