#!/usr/bin/env bash
# fusion-dist under torchrun (c10d rendezvous). Any fusion-dist command that trains: train, pretrain-av.
#
#   one node, all its GPUs:
#     bash launch/torchrun.sh train configs/paper/deepmlf_mosi.yaml [key=value ...]
#   several nodes: the same command on every node, pointing at one rendezvous endpoint
#     FD_NNODES=2 FD_MASTER_ADDR=gpu-node-01 FD_MASTER_PORT=29500 bash launch/torchrun.sh train CONFIG [key=value ...]
#   under Slurm, one task per node does the above for you:  bash launch/srun.sh torchrun train CONFIG ...
#
# Settings (environment):
#   FD_PROCS_PER_NODE  ranks per node (default: the node's GPUs, or 1)
#   FD_NNODES          number of nodes (default 1)
#   FD_MASTER_ADDR     rendezvous host (multi-node; the head node by convention; a single node needs none)
#   FD_MASTER_PORT     rendezvous port (default 29500)
#   FD_RDZV_ID         rendezvous id shared by the nodes of one run (default fusion-dist; Slurm: the job id)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
[ $# -ge 2 ] || fd_die "usage: launch/torchrun.sh {train|pretrain-av} CONFIG [key=value ...]"

procs=$(fd_procs_per_node)
nnodes=${FD_NNODES:-1}
if [ "$nnodes" = 1 ] && [ -z "${FD_MASTER_ADDR:-}" ]; then
  rdzv=(--standalone)
else
  [ -n "${FD_MASTER_ADDR:-}" ] || fd_die "FD_NNODES=$nnodes needs FD_MASTER_ADDR (the rendezvous host)"
  rdzv=(--rdzv-backend=c10d --rdzv-endpoint="$FD_MASTER_ADDR:${FD_MASTER_PORT:-29500}" --rdzv-id="${FD_RDZV_ID:-fusion-dist}")
fi
fd_ignore_usr1
fd_log "torchrun: $nnodes node(s) x $procs rank(s), ${rdzv[*]}: fusion-dist $*"
rc=0
torchrun --nnodes="$nnodes" --nproc-per-node="$procs" "${rdzv[@]}" --max-restarts=0 -m fusion_dist.cli "$@" || rc=$?
fd_log "torchrun exited with $rc"
exit "$rc"
