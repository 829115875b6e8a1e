# Third-party dependencies. scripts/setup_deps.sh installs them (Debian package names).
find_package(OpenMP REQUIRED)
find_package(Threads REQUIRED)

# OpenBLAS, through its CBLAS header. The OpenMP build is preferred: BLAS then shares the OpenMP
# thread pool of our kernels instead of a second pool of pthreads competing for the same cores.
# (Debian installs it beside the pthread one; the build RPATH points at its directory.)
find_library(FTUNE_OPENBLAS_LIB NAMES openblas
  HINTS /usr/lib/${CMAKE_LIBRARY_ARCHITECTURE}/openblas-openmp
  NO_DEFAULT_PATH)
find_library(FTUNE_OPENBLAS_LIB NAMES openblas REQUIRED)
message(STATUS "ftune: OpenBLAS ${FTUNE_OPENBLAS_LIB}")
find_path(FTUNE_CBLAS_INCLUDE cblas.h PATH_SUFFIXES openblas x86_64-linux-gnu aarch64-linux-gnu REQUIRED)
add_library(ftune_blas INTERFACE)
target_link_libraries(ftune_blas INTERFACE ${FTUNE_OPENBLAS_LIB})
target_include_directories(ftune_blas INTERFACE ${FTUNE_CBLAS_INCLUDE})

if(FTUNE_CUDA)
  # sm_90 (H100/H200) by default; -DFTUNE_CUDA_ARCHS="80;90" or CMAKE_CUDA_ARCHITECTURES override.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES ${FTUNE_CUDA_ARCHS})
  endif()
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  message(STATUS "ftune: CUDA backend ON, architectures ${CMAKE_CUDA_ARCHITECTURES}")
  # NCCL (the GPU communicator, parallel/nccl/): optional; CUDA toolkits often ship it beside
  # cudart, else a system package (libnccl-dev). FTUNE_NCCL tells the parallel layer.
  find_path(FTUNE_NCCL_INCLUDE nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS})
  find_library(FTUNE_NCCL_LIB NAMES nccl HINTS ${CUDAToolkit_LIBRARY_DIR})
  if(FTUNE_NCCL_INCLUDE AND FTUNE_NCCL_LIB)
    set(FTUNE_NCCL ON)
    add_library(ftune_nccl INTERFACE)
    target_link_libraries(ftune_nccl INTERFACE ${FTUNE_NCCL_LIB} CUDA::cudart_static)
    target_include_directories(ftune_nccl INTERFACE ${FTUNE_NCCL_INCLUDE})
    message(STATUS "ftune: NCCL ${FTUNE_NCCL_LIB}")
  else()
    set(FTUNE_NCCL OFF)
    message(STATUS "ftune: NCCL not found: no nccl communicator")
  endif()
else()
  set(FTUNE_NCCL OFF)
  message(STATUS "ftune: CUDA backend OFF")
endif()

if(FTUNE_MPI)
  find_package(MPI COMPONENTS CXX)
  if(NOT MPI_CXX_FOUND)
    message(WARNING "ftune: MPI not found; building without it (FTUNE_MPI=OFF)")
    set(FTUNE_MPI OFF CACHE BOOL "" FORCE)
  endif()
endif()

if(FTUNE_HDF5)
  set(HDF5_PREFER_PARALLEL TRUE)
  find_package(HDF5 COMPONENTS C)
  if(NOT HDF5_FOUND)
    message(WARNING "ftune: HDF5 not found; building without it (FTUNE_HDF5=OFF)")
    set(FTUNE_HDF5 OFF CACHE BOOL "" FORCE)
  else()
    add_library(ftune_hdf5 INTERFACE)
    target_link_libraries(ftune_hdf5 INTERFACE ${HDF5_C_LIBRARIES})
    target_include_directories(ftune_hdf5 INTERFACE ${HDF5_C_INCLUDE_DIRS})
    target_compile_definitions(ftune_hdf5 INTERFACE ${HDF5_C_DEFINITIONS})
    # A parallel HDF5's hdf5.h includes mpi.h: its users need MPI's headers (serial files work
    # without MPI_Init; see docs/checkpoint-format.md).
    if(HDF5_IS_PARALLEL)
      find_package(MPI COMPONENTS C REQUIRED)
      target_link_libraries(ftune_hdf5 INTERFACE MPI::MPI_C)
    endif()
  endif()
endif()
