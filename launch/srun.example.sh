#!/usr/bin/env bash
# launch/srun.example.sh - starting a distributed `moe train` under Slurm.  Submit with
#     sbatch launch/srun.example.sh
# and edit the #SBATCH lines, the paths and the config first.  See launch/mpirun.example.sh for the
# (dp, ep) layout: parallel.ep must divide the world size (nodes * tasks per node), and should not exceed
# the tasks per node so that each expert-parallel group (the all-to-all traffic) stays on one machine.
#
#SBATCH --job-name=moe-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=moe-%j.out
set -euo pipefail
ROOT="${MOE_ROOT:-$HOME/moe}"
MOE="$ROOT/build/moe"

# One task per GPU, bound to it (--gpus-per-task=1 shows each task only its GPU, as device 0).  Open MPI
# built with Slurm support (Debian's is) takes its rank and size from srun through PMIx: --mpi=pmix.
# Slurm kills the whole step when one task fails (--kill-on-bad-exit=1), like mpirun does.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
export NCCL_DEBUG=WARN
srun --ntasks-per-node=8 --gpus-per-task=1 --cpus-per-task="$OMP_NUM_THREADS" --mpi=pmix \
	--kill-on-bad-exit=1 \
	"$MOE" train --config "$ROOT/configs/deepseek-v2-lite.json" --set parallel.ep=8 \
	--set checkpoint.dir="$ROOT/runs/v2lite/ckpt" --resume latest

# Alternatively, inside an allocation (salloc -N 2 --ntasks-per-node=8 --gpus-per-task=1), mpirun reads
# the node list from Slurm:
#     mpirun --map-by ppr:8:node "$MOE" train --config ... --set parallel.ep=8
