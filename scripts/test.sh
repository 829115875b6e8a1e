#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite with ctest (MPI tests included).
# Then builds once more with every option off (no CUDA, MPI, HDF5) and runs that suite too,
# because everything optional must build away. FTUNE_TEST_MINIMAL=0 skips the second build.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_deps.sh
source scripts/env.sh

BUILD_DIR=build scripts/build.sh
(cd build && ctest --output-on-failure -j "$FTUNE_JOBS" ${CTEST_ARGS:-})

# The libFuzzer targets (safetensors header, config.json, tokenizer.json parsers) need clang:
# a third build with ASan+UBSan runs each for FTUNE_FUZZ_SECONDS (default 30) under ctest.
# FTUNE_TEST_FUZZ=0 skips it.
if [ "${FTUNE_TEST_FUZZ:-1}" = "1" ]; then
  echo "== fuzz build: clang, FTUNE_FUZZ=ON"
  CC=clang CXX=clang++ BUILD_DIR=build-fuzz scripts/build.sh -DFTUNE_FUZZ=ON -DFTUNE_CUDA=OFF \
    -DFTUNE_MPI=OFF -DFTUNE_HDF5=OFF -DFTUNE_BUILD_BENCH=OFF -DFTUNE_BUILD_TESTS=OFF \
    -DFTUNE_FUZZ_SECONDS="${FTUNE_FUZZ_SECONDS:-30}"
  (cd build-fuzz && ctest --output-on-failure -L fuzz)
fi

if [ "${FTUNE_TEST_MINIMAL:-1}" = "1" ]; then
  echo "== minimal build: FTUNE_CUDA=OFF FTUNE_MPI=OFF FTUNE_HDF5=OFF"
  BUILD_DIR=build-minimal scripts/build.sh -DFTUNE_CUDA=OFF -DFTUNE_MPI=OFF -DFTUNE_HDF5=OFF \
    -DFTUNE_BUILD_BENCH=OFF
  (cd build-minimal && ctest --output-on-failure -j "$FTUNE_JOBS" ${CTEST_ARGS:-})
fi
