#!/usr/bin/env bash
# launch/mpirun.example.sh - starting a distributed `moe train` with Open MPI.  Examples to copy and edit,
# not a script to run as is (it runs the first example when executed).
#
# Layout (SPEC 6): world W = dp * ep.  Ranks [g*ep, (g+1)*ep) are expert-parallel group g: each holds
# E/ep of the routed experts of every MoE layer and they exchange tokens by all-to-all.  Everything else is
# replicated.  parallel.ep must divide W, and E (model.n_routed_experts) must be divisible by parallel.ep.
# Keep an expert-parallel group inside one machine (ep <= ranks per node): the all-to-all is the heavy
# traffic.  Every rank reads its own micro-batches: the global batch is W * train.micro_batch *
# train.grad_accum sequences.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE="${MOE:-$ROOT/build/moe}"

# Open MPI refuses to run as root unless told (containers).  Harmless otherwise.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# ---- one machine --------------------------------------------------------------------------------------
# 4 ranks = 2 data-parallel groups of 2 expert-parallel ranks.  CPU: each rank uses OMP_NUM_THREADS
# threads, so ranks * threads should not exceed the cores (add --oversubscribe to run more ranks than
# cores, for testing).  GPU: one rank per GPU (NCCL refuses two ranks on one device); each rank picks the
# GPU of its node-local rank.
mpirun -np 4 --bind-to none -x OMP_NUM_THREADS=1 \
	"$MOE" train --config "$ROOT/configs/tiny.json" --set parallel.ep=2
exit 0

# Without a network (a laptop, a sandbox), keep Open MPI on shared memory:
mpirun -np 4 --oversubscribe --mca btl self,vader --mca pml ob1 \
	"$MOE" train --config "$ROOT/configs/tiny.json" --set parallel.ep=4

# ---- a cluster, with a hostfile ----------------------------------------------------------------------
# hosts.txt, one line per machine with its GPU count:
#     node01 slots=8
#     node02 slots=8
# 16 ranks, 8 per node (one per GPU), ranks filled node by node so that an expert-parallel group of 8 is
# one machine (all-to-all over NVLink, gradient reductions across machines).  -x passes variables on to
# every rank; NCCL_DEBUG=WARN prints NCCL's own errors; NCCL_SOCKET_IFNAME / NCCL_IB_HCA pick the network.
mpirun -np 16 --hostfile hosts.txt --map-by ppr:8:node --bind-to numa \
	-x PATH -x LD_LIBRARY_PATH -x NCCL_DEBUG=WARN \
	"$MOE" train --config "$ROOT/configs/deepseek-v2-lite.json" --set parallel.ep=8 \
	--set checkpoint.dir=/shared/runs/v2lite/ckpt --resume latest

# A rank that fails (an error, a crash, a killed process) ends the whole job: moe aborts with
# "moe: rank R: ..." and mpirun tears the other ranks down.  Resume with --resume latest.
