// The ftune command line. Only main() turns errors into an exit code.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "core/ops.h"
#include "core/rng.h"
#include "core/allocator.h"

namespace {

void usage() {
  std::printf(
      "ftune %s: fine-tune LLMs (SFT, LoRA, reward, DPO, PPO, distillation)\n\n"
      "usage: ftune <command> [args]\n\n"
      "commands:\n"
      "  version      print the version and the backends this build has\n"
      "  smoke        run a tiny forward/backward on the CPU and print the loss\n",
      FTUNE_VERSION);
}

int cmd_version() {
  std::printf("ftune %s\n", FTUNE_VERSION);
#ifdef FTUNE_HAVE_CUDA
  std::printf("cuda: built (devices: %d)\n", ftune::cuda_device_count());
#else
  std::printf("cuda: not built\n");
#endif
#ifdef FTUNE_HAVE_MPI
  std::printf("mpi: built\n");
#else
  std::printf("mpi: not built\n");
#endif
#ifdef FTUNE_HAVE_HDF5
  std::printf("hdf5: built\n");
#else
  std::printf("hdf5: not built\n");
#endif
  return 0;
}

}  // namespace

int cmd_smoke();

int main(int argc, char** argv) {
  try {
    if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help")) {
      usage();
      return argc < 2 ? 2 : 0;
    }
    std::string cmd = argv[1];
    if (cmd == "version" || cmd == "--version") return cmd_version();
    if (cmd == "smoke") return cmd_smoke();
    std::fprintf(stderr, "ftune: unknown command '%s' (try ftune --help)\n", cmd.c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ftune: error: %s\n", e.what());
    return 1;
  }
}
