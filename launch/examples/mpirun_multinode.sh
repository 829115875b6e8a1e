#!/usr/bin/env bash
# Multi-node ftune with Open MPI's mpirun (no scheduler): one rank per GPU, 8 GPUs per node.
#
#   ./mpirun_multinode.sh hosts.txt recipes/my_run.yaml [overrides...]
#
# hosts.txt lists one node per line with its GPU count, e.g.
#   node01 slots=8
#   node02 slots=8
# Requirements: passwordless ssh between the nodes, the same ftune build at the same path on
# every node (or a shared file system), and the recipe's output folder on a file system every node
# sees (checkpoints are ONE file written by all ranks through MPI-IO: docs/distributed.md).
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE RECIPE [overrides...]}
RECIPE=${2:?usage: $0 HOSTFILE RECIPE [overrides...]}
shift 2
FTUNE=${FTUNE:-$(command -v ftune || echo ./build/ftune)}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODES=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")
NP=$((NODES * GPUS_PER_NODE))

# NCCL (the GPU collectives; bootstrapped over MPI, so no MASTER_ADDR/MASTER_PORT is needed).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}  # NCCL's TCP bootstrap/fallback NICs
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}                       # InfiniBand/RoCE adapters to use
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                         # INFO to see the rings/trees chosen
# CPU threads per rank (ftune's CPU kernels and OpenBLAS): the cores of the node / GPUs per node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / GPUS_PER_NODE ))}

# --map-by ppr:8:node  8 ranks per node, ranks 0-7 on the first node (tp groups stay in a node:
#                      ftune lays the grid out tp-major)
# PE=N --bind-to core  each rank gets OMP_NUM_THREADS cores of its own (use --bind-to numa, or
#                      none, if your nodes' GPU/NUMA affinity says otherwise)
# -x VAR               forwards an environment variable to the remote ranks
# --mca pml ucx        InfiniBand through UCX for MPI's own traffic (the CPU collectives, the
#                      MPI-IO of checkpoints); drop it on Ethernet-only clusters
# The wrapper gives each rank one GPU: its node-local rank picks it (single quotes: the
# variable expands on the rank, not here).
# shellcheck disable=SC2016
exec mpirun --hostfile "$HOSTFILE" -np "$NP" \
  --map-by "ppr:${GPUS_PER_NODE}:node:PE=${OMP_NUM_THREADS}" --bind-to core \
  --mca pml ucx \
  -x NCCL_SOCKET_IFNAME -x NCCL_IB_HCA -x NCCL_DEBUG -x OMP_NUM_THREADS -x PATH -x LD_LIBRARY_PATH \
  bash -c 'export CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK; exec "$0" "$@"' \
  "$FTUNE" run "$RECIPE" "$@"
