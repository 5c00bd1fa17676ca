#!/bin/bash
# Stage 1: the AV encoder alone (fusion-dist pretrain-av), whose export stage 2 loads, on a Slurm cluster:
#   sbatch slurm/pretrain_av.sh          (from the checkout; the log is logs/fd-pretrain-av-<jobid>.out)
# Edit the #SBATCH lines for your cluster. Every FD_* setting can also come from the environment, e.g.
#   FD_OVERRIDES="run.dir=runs/try2 pretrain.epochs=5" sbatch slurm/pretrain_av.sh
# (all settings: slurm/_common.sh; checking the config before queueing: bash slurm/submit.sh slurm/pretrain_av.sh).
# Other datasets: FD_CONFIG=configs/paper/deepmlf_mosei.yaml FD_OVERRIDES="run.dir=runs/deepmlf_mosei_av"
#SBATCH --job-name=fd-pretrain-av
#SBATCH --nodes=1                  # nodes
#SBATCH --ntasks-per-node=1        # one launcher per node (FD_LAUNCHER=srun: one task per GPU, = GPUs per node)
#SBATCH --gpus-per-node=1          # GPUs per node (a CPU-only cluster: sbatch --gpus-per-node=0 ...)
#SBATCH --cpus-per-task=4          # CPU cores per launcher task (data loading, tokenization)
#SBATCH --time=24:00:00            # wall-clock limit; the job checkpoints and requeues 5 min before it
##SBATCH --partition=gpu           # your GPU partition (default: the cluster's default partition)
#SBATCH --signal=B:USR1@300        # SIGUSR1 to this script 300 s before the limit: checkpoint + requeue
#SBATCH --requeue                  # let `scontrol requeue` put the job back in the queue after preemption
#SBATCH --open-mode=append         # a requeued job appends to the same log
#SBATCH --output=logs/%x-%j.out    # per-job log (stdout + stderr); sbatch does not create logs/

: "${FD_CONFIG:=configs/paper/deepmlf_mosi.yaml}"
: "${FD_COMMAND:=pretrain-av}"
: "${FD_OVERRIDES:=run.dir=runs/deepmlf_mosi_av}"  # stage 1 trains with the config's pretrain section; model.av.checkpoint of the paper config = <run.dir>/export
# sbatch runs a copy of this file from its spool directory: the checkout is found from the submitted path
# (the first record: an array job's id shows all of its tasks).
submitted=$(scontrol show job "${SLURM_JOB_ID:?submit with sbatch}" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)
: "${FD_HOME:=$(dirname "$(dirname "$submitted")")}"
source "$FD_HOME/slurm/_common.sh"
