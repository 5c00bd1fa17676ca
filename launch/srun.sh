#!/usr/bin/env bash
# fusion-dist inside a Slurm allocation (an sbatch script, or salloc), with one rendezvous on the head
# node (the first of `scontrol show hostnames $SLURM_JOB_NODELIST`). Three forms:
#
#   bash launch/srun.sh torchrun  train CONFIG [key=value ...]   one task per node, each runs launch/torchrun.sh (c10d)
#   bash launch/srun.sh deepspeed train CONFIG [key=value ...]   one task per node, each runs launch/deepspeed.sh --no_ssh
#   bash launch/srun.sh srun      train CONFIG [key=value ...]   one task per GPU, each is a rank itself
#                                                                (allocate with --ntasks-per-node = GPUs per node)
#
# Settings (environment): FD_PROCS_PER_NODE (ranks per node; default the GPUs Slurm gave each node, or 1),
# FD_MASTER_PORT (default: fusion_dist.dist.slurm_master_port of the job id, as srun ranks derive it).
# If any task fails, srun stops the others (--kill-on-bad-exit), so a dead rank ends the step.
# The srun process is exec'ed: signalling this script's pid signals srun, which forwards to every task.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/_lib.sh"
[ -n "${SLURM_JOB_ID:-}" ] || fd_die "launch/srun.sh runs inside a Slurm allocation (sbatch or salloc)"
[ $# -ge 3 ] || fd_die "usage: launch/srun.sh {torchrun|deepspeed|srun} {train|pretrain-av} CONFIG [key=value ...]"
mode=$1; shift

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
procs=$(fd_procs_per_node)
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${FD_MASTER_PORT:-$(python -c "from fusion_dist.dist import slurm_master_port; print(slurm_master_port($SLURM_JOB_ID))")} \
  || fd_die "no fusion-dist on this python (activate its environment, or set FD_VENV)"
per_node=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)

case "$mode" in
  torchrun)
    export FD_NNODES=$nodes FD_MASTER_ADDR=$head FD_MASTER_PORT=$port FD_RDZV_ID=$SLURM_JOB_ID FD_PROCS_PER_NODE=$procs
    exec "${per_node[@]}" bash "$here/torchrun.sh" "$@" ;;
  deepspeed)
    # each node writes the (identical) hostfile locally, so no shared /tmp is assumed, and takes its
    # node index in the allocation as its line in the hostfile
    export FD_MASTER_ADDR=$head FD_MASTER_PORT=$port
    exec "${per_node[@]}" bash -c 'trap "" USR1
      hostfile=${TMPDIR:-/tmp}/fusion-dist-$SLURM_JOB_ID.$SLURM_STEP_ID.$SLURM_NODEID.hosts
      scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$1/" > "$hostfile"
      FD_NODE_RANK=$SLURM_NODEID bash "$0" "$hostfile" "${@:2}"; rc=$?
      rm -f "$hostfile"; exit $rc' "$here/deepspeed.sh" "$procs" "$@" ;;
  srun)
    export MASTER_ADDR=$head MASTER_PORT=$port
    fd_log "srun: $nodes node(s) x $procs rank(s), rendezvous $head:$port: fusion-dist $*"
    exec srun --nodes="$nodes" --ntasks=$((nodes * procs)) --ntasks-per-node="$procs" --kill-on-bad-exit=1 \
      bash -c 'trap "" USR1; echo "fusion-dist launch: $(hostname -s): rank $SLURM_PROCID"; exec python -m fusion_dist.cli "$@"' \
      fusion-dist "$@" ;;
  *) fd_die "unknown launcher '$mode': use torchrun, deepspeed or srun" ;;
esac
