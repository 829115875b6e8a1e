#!/usr/bin/env bash
# Installs what is missing, builds, and runs a demo. Until the SFT loop lands (recipes and the
# embedded tiny model), the demo is `ftune smoke`: a tiny forward/backward/update on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_deps.sh
BUILD_DIR=build scripts/build.sh
./build/ftune version
./build/ftune smoke
