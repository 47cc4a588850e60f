"""Register, spill and shared-memory use of every CUDA kernel, from ptxas.

Compiles each csrc/cuda/*.cu with the flags of the package build plus
`-Xptxas -v` for every architecture of TORCH_CUDA_ARCH_LIST (default 8.0;9.0)
and prints one line per (kernel, architecture). With --json PATH the table is
also written as JSON; --compare OLD.json prints the lines that differ from an
earlier report (to check that a change leaves the device code alone):

    python tools/ptxas_report.py --json before.json          # on the old tree
    python tools/ptxas_report.py --compare before.json       # on the new one

Needs nvcc; no GPU.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_home():
    spec = importlib.util.spec_from_file_location("_lmm_cuda_home", os.path.join(ROOT, "tools", "cuda_home.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home()


def nvcc_command(source, output, arch_list):
    home = _cuda_home()
    if home:
        os.environ["CUDA_HOME"] = home
    from torch.utils import cpp_extension

    nvcc = os.path.join(home, "bin", "nvcc") if home else "nvcc"
    includes = [f"-I{p}" for p in cpp_extension.include_paths(device_type="cuda")]
    gencode = []
    for arch in arch_list.replace(",", ";").split(";"):
        num = arch.strip().replace(".", "").replace("+PTX", "")
        if num:
            gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    return [nvcc, "-c", source, "-o", output, f"-I{os.path.join(ROOT, 'csrc')}", *includes,
            *cpp_extension.COMMON_NVCC_FLAGS, "-std=c++20", "-O3", "-lineinfo",
            "-DLMM_FAST_WITH_CUDA", "-DLMM_FAST_PYTHON_MODULE", "-Xcompiler", "-fPIC",
            "-Xptxas", "-v", *gencode]


ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SHARED = re.compile(r"(\d+) bytes smem")


def demangle(names):
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        return out.stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names


def parse(text, source):
    rows, current = [], None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            current = {"file": source, "kernel": m.group(1), "arch": m.group(2), "registers": None,
                       "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = STACK.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        m = USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = SHARED.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["name"] = name
    return rows


def report(sources, arch_list):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources:
            cmd = nvcc_command(source, os.path.join(tmp, "out.o"), arch_list)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise SystemExit(f"nvcc failed on {source}")
            rows += parse(done.stderr, os.path.relpath(source, ROOT))
    return rows


def key(row):
    # the demangled name: nvcc mangles anonymous namespaces with a per-build tag
    return (row["file"], row["name"], row["arch"])


def fmt(row):
    return (f"{row['arch']:6s} regs {row['registers']:3d}  stack {row['stack']:4d}  spill st/ld "
            f"{row['spill_stores']:4d}/{row['spill_loads']:4d}  smem {row['smem']:5d}  {row['file']}: {row['name']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="*", help="default: csrc/cuda/*.cu")
    parser.add_argument("--json", help="write the table to this file")
    parser.add_argument("--compare", help="an earlier --json report: print what changed")
    args = parser.parse_args()
    sources = args.sources or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    rows = report(sources, os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    for row in rows:
        print(fmt(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            old = {key(r): r for r in json.load(f)}
        new = {key(r): r for r in rows}
        fields = ("registers", "stack", "spill_stores", "spill_loads", "smem")
        changed = 0
        print(f"\n--- compared with {args.compare}: {len(old)} entries before, {len(new)} now")
        for k in sorted(set(old) | set(new)):
            a, b = old.get(k), new.get(k)
            if a is None or b is None:
                changed += 1
                print(("only now:    " if a is None else "only before: ") + fmt(a or b))
            elif any(a[f] != b[f] for f in fields):
                changed += 1
                print("before: " + fmt(a) + "\nnow:    " + fmt(b))
        print(f"{changed} entries differ")


if __name__ == "__main__":
    main()
