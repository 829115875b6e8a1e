#!/usr/bin/env python3
"""Static SASS statistics of CUDA kernels, no GPU needed: registers, stack (spills), and for each
loop (a backward branch) the instruction count per iteration with the tensor-core MMAs (HMMA),
shared-memory matrix loads (LDSM), MUFU (exp2) and local-memory spills (LDL/STL) in it.

  bench/gpu/sass_loops.py OBJ [NAME_SUBSTRING ...]

OBJ is an object or executable with sm_90 SASS (e.g.
build/CMakeFiles/ftune_core.dir/kernels/cuda/attention.cu.o). Needs cuobjdump and c++filt:
cuobjdump and nvdisasm come with the CUDA toolkit, or `pip install nvidia-cuda-cuobjdump
nvidia-cuda-nvdisasm` (site-packages/nvidia/cu13/bin). A loop's count covers every path through
its body (both sides of a branch); bench/gpu/sass_attention.sh also measures the attention
kernels' unmasked path.
"""
import collections
import glob
import os
import re
import shutil
import signal
import site
import subprocess
import sys


def tool(name):
    exe = shutil.which(name)
    if exe:
        return exe
    roots = [os.environ.get("CUDA_HOME", "/usr/local/cuda")] + site.getsitepackages()
    for root in roots:
        for c in [os.path.join(root, "bin", name)] + glob.glob(
                os.path.join(root, "nvidia", "cu*", "bin", name)):
            if os.access(c, os.X_OK):
                return c
    sys.exit(f"sass_loops.py: no {name} (CUDA toolkit bin/, or "
             "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")


def cuobjdump():
    exe = tool("cuobjdump")
    # cuobjdump -sass runs nvdisasm, which the pip wheels put in a directory of their own.
    os.environ["PATH"] = os.path.dirname(tool("nvdisasm")) + os.pathsep + os.environ["PATH"]
    return exe


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.split("\n")
    return {n: d.replace("ftune::kernels::cuda::(anonymous namespace)::", "").split("(")[0]
            for n, d in zip(names, out)}


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    obj, pats = sys.argv[1], sys.argv[2:]
    exe = cuobjdump()
    sass = subprocess.run([exe, "-sass", obj], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([exe, "-res-usage", obj], capture_output=True, text=True, check=True).stdout
    usage = {m.group(1): (int(m.group(2)), int(m.group(3)))
             for m in re.finditer(r"Function ([^:]+):\s*\n?\s*REG:(\d+) STACK:(\d+)", res)}
    funcs = [(f.split("\n", 1)[0].strip(), f) for f in re.split(r"\n\s+Function : ", sass)[1:]]
    names = demangle([n for n, _ in funcs])
    for name, body in funcs:
        dem = names[name]
        if pats and not any(p in dem for p in pats):
            continue
        ins = []
        for line in body.split("\n"):
            m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*)", line)
            if m:
                ins.append((int(m.group(1), 16), m.group(3).split(".")[0], m.group(4)))
        at = {a: i for i, (a, _, _) in enumerate(ins)}
        reg, stack = usage.get(name, (0, 0))
        print(f"{dem}: {len(ins)} instructions, {reg} registers, {stack} bytes stack")
        for i, (a, op, rest) in enumerate(ins):
            t = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
            if not t or int(t.group(1), 16) >= a or int(t.group(1), 16) not in at:
                continue
            lo = at[int(t.group(1), 16)]
            c = collections.Counter(o for _, o, _ in ins[lo:i + 1])
            n = i + 1 - lo
            if c["HMMA"]:
                extra = f" ({(n - c['HMMA']) / c['HMMA']:.2f} other per HMMA)"
            else:
                extra = ""
            print(f"  loop {ins[lo][0]:#06x}-{a:#06x}: {n} instructions{extra}; " +
                  ", ".join(f"{k} {c[k]}" for k in ["HMMA", "HGMMA", "LDSM", "MUFU", "LDG", "LDL", "STL", "BAR"]
                            if c[k]))


if __name__ == "__main__":
    main()
