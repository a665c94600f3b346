"""Offline check (no GPU): a CUDA source of the extension compiles to the same SASS before and after
a refactor. Compiles each .cu at a git revision and in the working tree with nvcc -cubin for sm_90a
(the extension's flags), disassembles both with cuobjdump -sass and compares every kernel's body
(instructions and their encodings) by name. Names are compared without the anonymous-namespace tag
(it depends on the file); --rename maps a kernel's old mangled fragment to its new one (a template
parameter list that became a constant, say).

    python benchmarks/experiments/same_sass.py REV csrc/vae_conv/vae_conv_cuda.cu csrc/causal_conv/causal_conv_cuda.cu \
        [--rename OLD=NEW ...]

cuobjdump: $CUOBJDUMP, else the one on PATH, else triton's copy. Exit status 0 when every kernel of
the working tree has an identical kernel at REV (kernels only at REV are listed as removed).
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

NVCC_FLAGS = ["-cubin", "-O3", "-DNDEBUG", "-DCOGVIDEOX_WITH_CUDA=1", "-gencode", "arch=compute_90a,code=sm_90a",
              "--expt-relaxed-constexpr", "-lineinfo", "-std=c++17"]


def cuobjdump():
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    if shutil.which("cuobjdump"):
        return shutil.which("cuobjdump")
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sass(root, source, tmp):
    cubin = os.path.join(tmp, re.sub(r"\W", "_", root) + ".cubin")
    subprocess.run(["nvcc", *NVCC_FLAGS, "-I", os.path.join(root, "csrc"), "-o", cubin, os.path.join(root, source)],
                   check=True)
    return subprocess.run([cuobjdump(), "-sass", cubin], check=True, capture_output=True, text=True).stdout


def kernels(text):
    """{normalised name: [instruction lines with encodings]}"""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            name = re.sub(r"\d+_GLOBAL__N__[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]+", "(anon)", m.group(1))
            out[name] = []
        elif name and re.match(r"\s+/\*", line):
            out[name].append(line.rstrip())
    return out


def count(body):
    return sum(1 for line in body if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--rename", action="append", default=[], metavar="OLD=NEW")
    a = ap.parse_args()
    rename = [r.split("=", 1) for r in a.rename]
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                          text=True).stdout.strip()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        old_root = os.path.join(tmp, "old")
        os.makedirs(old_root)
        archive = subprocess.run(["git", "-C", repo, "archive", a.rev, "csrc"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", old_root], input=archive, check=True)
        for source in a.sources:
            old, new = kernels(sass(old_root, source, tmp)), kernels(sass(repo, source, tmp))
            print(f"{source}: {len(new)} kernels now, {len(old)} at {a.rev}")
            matched = set()
            for name, body in sorted(new.items()):
                was = next((name.replace(n, o) for o, n in rename if n in name and name.replace(n, o) in old), name)
                same = old.get(was) == body
                ok &= same
                matched.add(was)
                state = "identical" if same else ("DIFFERENT" if was in old else "NEW")
                print(f"  {state:9s} {count(body):6d} instr  {name}" + (f"  (was {was})" if was != name else ""))
            for name in sorted(set(old) - matched):
                print(f"  removed   {count(old[name]):6d} instr  {name}")
    print("every kernel identical" if ok else "SASS CHANGED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
