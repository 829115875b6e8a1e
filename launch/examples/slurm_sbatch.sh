#!/usr/bin/env bash
# ftune on a Slurm cluster: 2 nodes x 8 GPUs, one rank per GPU.
#
#   sbatch launch/examples/slurm_sbatch.sh recipes/my_run.yaml [overrides...]
#
# Gradients over NCCL instead of MPI: add the override parallel.backend=nccl (docs/distributed.md
# "NCCL"; never run on several GPUs yet).
# The recipe's output folder must be on a file system every node sees (Lustre, GPFS, ...):
# checkpoints are one HDF5 file written by all ranks (docs/distributed.md).
#SBATCH --job-name=ftune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=ftune-%j.out
#SBATCH --exclusive
set -euo pipefail
RECIPE=${1:?usage: sbatch $0 RECIPE [overrides...]}
shift
FTUNE=${FTUNE:-$(command -v ftune || echo ./build/ftune)}

# NCCL: bootstrapped over MPI (rank 0 broadcasts the NCCL id), so no MASTER_ADDR/MASTER_PORT.
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker0}  # NICs for NCCL's TCP bootstrap
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}                       # InfiniBand/RoCE adapters
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}                         # INFO when diagnosing the fabric
# One CPU thread per core Slurm gave the task (ftune's CPU kernels and OpenBLAS use OpenMP).
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
export OMP_PROC_BIND=close OMP_PLACES=cores

# Open MPI's mpirun reads the allocation (nodes, slots) from Slurm: no hostfile. Each rank is
# bound to its --cpus-per-task cores and sees one GPU (its node-local rank). With a PMIx-enabled
# Slurm, `srun --mpi=pmix --cpu-bind=cores --kill-on-bad-exit=1` instead of mpirun works (ftune reads
# the rank from PMIx/PMI; use $SLURM_LOCALID for CUDA_VISIBLE_DEVICES then).
#
# Failure: if any rank throws or dies, mpirun kills the whole job and exits non-zero (see
# docs/distributed.md, "Failure handling"); resubmitting the same script resumes from the last
# complete checkpoint when the recipe resumes from its output folder.
mpi_env="-x NCCL_SOCKET_IFNAME -x NCCL_IB_HCA -x NCCL_DEBUG -x OMP_NUM_THREADS -x OMP_PROC_BIND -x OMP_PLACES"
# shellcheck disable=SC2016,SC2086  # $OMPI_... expands on the rank; $mpi_env splits on purpose
mpirun -np "$SLURM_NTASKS" --map-by "ppr:${SLURM_NTASKS_PER_NODE}:node:PE=${OMP_NUM_THREADS}" \
  --bind-to core $mpi_env \
  bash -c 'export CUDA_VISIBLE_DEVICES=$OMPI_COMM_WORLD_LOCAL_RANK; exec "$0" "$@"' \
  "$FTUNE" run "$RECIPE" "$@"
