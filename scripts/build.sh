#!/usr/bin/env bash
# Configures and builds ftune into BUILD_DIR (default: build). Extra args go to cmake.
#   scripts/build.sh                      # Release, CUDA on when nvcc is found (sm_90)
#   BUILD_DIR=build-min scripts/build.sh -DFTUNE_CUDA=OFF -DFTUNE_MPI=OFF -DFTUNE_HDF5=OFF
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
BUILD_DIR="${BUILD_DIR:-build}"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" "$@"
cmake --build "$BUILD_DIR" -j "$FTUNE_JOBS"
