#!/usr/bin/env bash
# fusion-dist under the deepspeed launcher with a hostfile. Any fusion-dist command that trains.
#
#   HOSTFILE: one node per line, "hostname slots=GPUS" (comments with #); its first host is the
#   rendezvous (MASTER_ADDR) unless FD_MASTER_ADDR says otherwise.
#
#   over ssh (pdsh), from the first host; the launcher starts every node:
#     bash launch/deepspeed.sh hostfile train configs/paper/deepmlf_mosi.yaml [key=value ...]
#     Remote ranks get MLFLOW_*, PYTHON*, NCCL_* from this shell; anything else they need (HF_HOME, ...)
#     goes into .deepspeed_env (NAME=value per line) in this directory or in $HOME.
#   without ssh: the same command on every node, each with its line index (0-based) in the hostfile:
#     FD_NODE_RANK=0 bash launch/deepspeed.sh hostfile train CONFIG ...   # on the first host
#     FD_NODE_RANK=1 bash launch/deepspeed.sh hostfile train CONFIG ...   # on the second, ...
#   under Slurm, one task per node does the no-ssh form for you:  bash launch/srun.sh deepspeed train CONFIG ...
#
# Settings (environment): FD_NODE_RANK (selects the no-ssh form), FD_MASTER_ADDR, FD_MASTER_PORT (default 29500).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
[ $# -ge 3 ] || fd_die "usage: launch/deepspeed.sh HOSTFILE {train|pretrain-av} CONFIG [key=value ...]"
hostfile=$1; shift
[ -f "$hostfile" ] || fd_die "hostfile $hostfile: not found"

# Check every host before any rank starts: a typo would otherwise surface as a rendezvous timeout.
hosts=()
lineno=0
while IFS= read -r line || [ -n "$line" ]; do
  lineno=$((lineno + 1))
  line=${line%%#*}
  read -r host slots extra <<< "$line" || true
  [ -n "${host:-}" ] || continue
  [[ "${slots:-}" =~ ^slots=[1-9][0-9]*$ ]] && [ -z "${extra:-}" ] ||
    fd_die "hostfile $hostfile line $lineno: expected 'HOSTNAME slots=N', got '$line'"
  getent hosts "$host" >/dev/null || fd_die "hostfile $hostfile line $lineno: unknown host '$host' (it does not resolve on $(hostname -s))"
  hosts+=("$host")
done < "$hostfile"
[ ${#hosts[@]} -gt 0 ] || fd_die "hostfile $hostfile: no hosts"

args=(--hostfile="$hostfile" --master_addr="${FD_MASTER_ADDR:-${hosts[0]}}" --master_port="${FD_MASTER_PORT:-29500}")
if [ -n "${FD_NODE_RANK:-}" ]; then
  [[ "$FD_NODE_RANK" =~ ^[0-9]+$ ]] && [ "$FD_NODE_RANK" -lt ${#hosts[@]} ] ||
    fd_die "FD_NODE_RANK=$FD_NODE_RANK: hostfile $hostfile has ${#hosts[@]} host(s), so it must be 0..$((${#hosts[@]} - 1))"
  args+=(--no_ssh --node_rank="$FD_NODE_RANK")
fi
fd_ignore_usr1
fd_log "deepspeed: ${#hosts[@]} host(s) (${hosts[*]}) ${args[*]}: fusion-dist $*"
rc=0
# --no_local_rank: ranks read LOCAL_RANK from the environment (an extra argument would land before the command)
deepspeed "${args[@]}" --no_local_rank --module fusion_dist.cli "$@" || rc=$?
fd_log "deepspeed exited with $rc"
exit "$rc"
