#!/usr/bin/env python3
"""Static check of the warpgroup-MMA kernels' asynchrony, from their compiled SASS (no GPU).

  python3 bench/gpu/wgmma_hazards.py build/CMakeFiles/ftune_core.dir/kernels/cuda/attention.cu.o

A wgmma (HGMMA in SASS) runs asynchronously: until a WARPGROUP.DEPBAR.LE gsb0, N retires its
group, no other instruction may read or write its accumulator registers or its A registers, and
registers written by ordinary instructions must be followed by a WARPGROUP.ARRIVE (wgmma.fence)
before an HGMMA uses them. For every kernel whose name holds "wgmma" (but not the layout probe),
this walks the SASS in address order, models the committed groups (retiring in order, as the
DEPBAR's N says), and reports:
  touch-inflight         an ordinary instruction reads or writes a register of a pending group
  no-arrive-after-write  an HGMMA uses a register written since the last WARPGROUP.ARRIVE
with, per kernel, the groups committed and each DEPBAR's (N, groups pending before it). Walking in
address order is sound for these kernels: their branches (masked or not) rejoin before any wait
and each loop iteration ends with every group retired. Exit status 1 when anything is reported.
Needs cuobjdump and nvdisasm (see bench/gpu/sass_loops.py).
"""
import os
import re
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_loops  # noqa: E402  (the cuobjdump lookup)


def parse(body):
    out = []
    for line in body.split("\n"):
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def width(op):  # registers a vector load/store or wide operation touches per operand
    for suffix, n in ((".128", 4), (".64", 2), (".WIDE", 2)):
        if suffix in op:
            return n
    return 1


def check(name, ins):
    pending, cur, found, deps = [], set(), [], []
    last_write, last_arrive, groups = {}, -1, 0
    for idx, (pc, text) in enumerate(ins):
        t = text.split(None, 1)[1] if text.startswith("@") else text
        parts = t.split(None, 1)
        op, rest = parts[0], parts[1] if len(parts) > 1 else ""
        ops = [o.strip() for o in rest.split(",")]
        if op == "WARPGROUP.ARRIVE":
            last_arrive = idx
            continue
        if op.startswith("WARPGROUP.DEPBAR"):
            n = int(ops[-1], 16)
            deps.append((n, len(pending) + (1 if cur else 0)))
            while len(pending) > n:
                pending.pop(0)
            continue
        if op.startswith("HGMMA"):
            n_cols = int(re.match(r"HGMMA\.64x(\d+)x16", op).group(1))
            acc = int(ops[0][1:])
            regs = set(range(acc, acc + n_cols // 2))
            if re.match(r"R\d+$", ops[1]):  # A from registers
                a = int(ops[1][1:])
                regs |= set(range(a, a + 4))
            late = [r for r in regs if last_write.get(r, -1) > last_arrive]
            if late:
                found.append(("no-arrive-after-write", hex(pc), text, late[:4]))
            cur |= regs
            if "gsb0" in text:  # the last HGMMA of a commit group
                pending.append(cur)
                cur = set()
                groups += 1
            continue
        w = width(op)
        touched, written = set(), set()
        for k, o in enumerate(ops):
            for r in re.findall(r"\bR(\d+)\b", o):
                rs = set(range(int(r), int(r) + w))
                touched |= rs
                if k == 0:
                    written |= rs
        for r in written:
            last_write[r] = idx
        inflight = set().union(*pending) | cur if pending else set(cur)
        if touched & inflight:
            found.append(("touch-inflight", hex(pc), text, sorted(touched & inflight)[:4]))
    return groups, deps, found


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`
    if len(sys.argv) < 2:
        print(__doc__)
        return 2
    sass = subprocess.run([sass_loops.cuobjdump(), "-sass", sys.argv[1]], capture_output=True,
                          text=True, check=True).stdout
    names = []
    bodies = []
    for f in re.split(r"\n\s*Function : ", sass)[1:]:
        name = f.split("\n", 1)[0].strip()
        if "wgmma" in name and "probe" not in name:
            names.append(name)
            bodies.append(f)
    pretty = sass_loops.demangle(names)
    bad = 0
    for name, body in zip(names, bodies):
        groups, deps, found = check(name, parse(body))
        print("%s: %d groups, DEPBAR (N, pending) %s, %d hazards" % (pretty.get(name, name), groups,
                                                                    deps, len(found)))
        for f in found[:5]:
            print("   ", f)
        bad += len(found)
    if not names:
        print("no wgmma kernels in", sys.argv[1])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
