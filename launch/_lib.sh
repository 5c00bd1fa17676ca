# Shared by the launch/*.sh wrappers and the slurm/ scripts (sourced, not run).

# Progress and errors, one line each, prefixed with FD_LOG_PREFIX (a Slurm job's scripts name the job).
FD_LOG_PREFIX=${FD_LOG_PREFIX:-"fusion-dist launch: $(hostname -s)"}
fd_log() { echo "$FD_LOG_PREFIX: $*"; }
fd_die() { echo "$FD_LOG_PREFIX: error: $*" >&2; exit 2; }

# The environment that has fusion-dist: FD_VENV, else this checkout's .venv, activated when it exists and no
# virtualenv is active already.
fd_activate_venv() {
  local venv=${FD_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi
}

# Ranks per node: FD_PROCS_PER_NODE, else the GPUs Slurm gave this node, else the GPUs nvidia-smi sees, else 1.
fd_procs_per_node() {
  local n=${FD_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  if [ -z "$n" ] && command -v nvidia-smi >/dev/null; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  [ -n "$n" ] && [ "$n" != 0 ] || n=1
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || fd_die "FD_PROCS_PER_NODE='$n' is not a positive integer"
  echo "$n"
}

# A preemption signal (SIGUSR1) is meant for the trainer ranks, which save and exit with a dedicated
# code. Slurm signals every process of a job step, launchers included, and SIGUSR1 would kill a launcher
# that does not handle it; ignored here, the setting is inherited by the launcher and its children,
# and the trainer installs its own handler.
fd_ignore_usr1() { trap '' USR1; }
