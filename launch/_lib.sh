# Shared by the launch/*.sh wrappers (sourced, not run).

fd_log() { echo "fusion-dist launch: $(hostname -s): $*"; }
fd_die() { echo "fusion-dist launch: $(hostname -s): error: $*" >&2; exit 2; }

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
