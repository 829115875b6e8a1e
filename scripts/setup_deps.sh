#!/usr/bin/env bash
# Installs every Debian package the build and the tests need. Idempotent: installs only what is
# missing, and runs `apt-get update` only when something is. Run as root (or with sudo available).
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build ccache pkg-config git
  libopenblas-dev libopenblas-openmp-dev  # CPU GEMM (the OpenMP build shares our thread pool)
  libopenmpi-dev openmpi-bin            # MPI launcher and communicator
  libhdf5-openmpi-dev                   # parallel HDF5 checkpoints
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libfmt-dev libpcre2-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  gnuplot-nox                           # benchmark plots
  clang libclang-rt-14-dev              # libFuzzer targets (scripts/test.sh runs them briefly)
  python3 python3-pip                   # reference side (fixtures, torch comparisons)
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup_deps: all ${#PKGS[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
