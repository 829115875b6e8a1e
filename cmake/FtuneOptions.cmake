# Build options. Everything optional builds away: without CUDA, MPI or HDF5 the project still
# builds and its tests pass (those tests skip with the reason).
include(CheckLanguage)
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  set(_ftune_cuda_default ON)
else()
  set(_ftune_cuda_default OFF)
endif()
option(FTUNE_CUDA "Build the CUDA backend (needs nvcc; no GPU needed to build)" ${_ftune_cuda_default})
option(FTUNE_MPI "Build the MPI communicator" ON)
option(FTUNE_HDF5 "Build HDF5 checkpoints" ON)
option(FTUNE_BUILD_TESTS "Build the tests" ON)
option(FTUNE_BUILD_BENCH "Build the benchmarks" ON)
option(FTUNE_NATIVE "Tune CPU code for this machine (-march=native)" OFF)
# 90a: the H100/H200 with Hopper's arch-specific instructions (wgmma), which the plain 90 target
# cannot assemble; the same machines run it. Other GPUs: add theirs, e.g. "80;90a".
set(FTUNE_CUDA_ARCHS "90a" CACHE STRING "CUDA architectures (CMAKE_CUDA_ARCHITECTURES list), e.g. 80;90a")

# ccache when present: a 2-core machine rebuilds a lot.
find_program(FTUNE_CCACHE ccache)
if(FTUNE_CCACHE)
  set(CMAKE_CXX_COMPILER_LAUNCHER ${FTUNE_CCACHE})
  set(CMAKE_C_COMPILER_LAUNCHER ${FTUNE_CCACHE})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${FTUNE_CCACHE})
endif()

set(FTUNE_WARNINGS -Wall -Wextra -Wno-unused-parameter)
if(FTUNE_NATIVE)
  set(FTUNE_ARCH_FLAGS -march=native)
else()
  # x86-64-v3 (AVX2/FMA) is every x86 server of the last decade; fall back to the default elsewhere.
  include(CheckCXXCompilerFlag)
  check_cxx_compiler_flag(-march=x86-64-v3 FTUNE_HAS_V3)
  if(FTUNE_HAS_V3)
    set(FTUNE_ARCH_FLAGS -march=x86-64-v3)
  endif()
endif()

# libFuzzer targets (tests/fuzz/, one fuzzer per file). clang only; everything is then built with
# ASan and coverage instrumentation, so use a separate build dir:
#   cmake -S . -B build-fuzz -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang \
#     -DFTUNE_FUZZ=ON -DFTUNE_CUDA=OFF -DFTUNE_MPI=OFF -DFTUNE_HDF5=OFF
option(FTUNE_FUZZ "Build the libFuzzer targets of tests/fuzz (needs clang)" OFF)
if(FTUNE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "FTUNE_FUZZ needs clang++ (libFuzzer): -DCMAKE_CXX_COMPILER=clang++")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined
                      -fno-omit-frame-pointer -g)
  add_link_options(-fsanitize=address,undefined)
endif()
