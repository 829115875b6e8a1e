# libFuzzer targets (tests/fuzz/), OFF by default: the default gcc build never sees them.
# Configure a separate clang build:
#   CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DFTUNE_FUZZ=ON -DFTUNE_CUDA=OFF \
#     -DFTUNE_MPI=OFF -DFTUNE_HDF5=OFF
# Everything in that build gets ASan and libFuzzer's coverage instrumentation (so the gtest
# executables there run under ASan too); the fuzz targets link libFuzzer's main.
option(FTUNE_FUZZ "Build the libFuzzer targets in tests/fuzz (needs clang)" OFF)
if(FTUNE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "FTUNE_FUZZ=ON needs clang (-fsanitize=fuzzer); the compiler is "
                        "${CMAKE_CXX_COMPILER_ID}. Use CC=clang CXX=clang++ in a separate build dir.")
  endif()
  add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined
                      -fno-omit-frame-pointer -g)
  add_link_options(-fsanitize=address,undefined)
endif()
