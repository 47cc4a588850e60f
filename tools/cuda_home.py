"""Locate the CUDA toolkit for builds (setup.py and the CMake build test).

Loaded by file path, so it must import nothing from the package.
"""
import glob
import os
import re
import shutil


def _toolkit_from_nvcc(nvcc):
    """Return the toolkit folder an nvcc belongs to, following wrapper scripts.

    Some machines put a small shell script named nvcc on PATH that execs the
    real compiler; torch's builder then guesses CUDA_HOME as the script's
    parent folder and the link fails (cannot find -lcudart). Read the script
    to find the compiler it runs.
    """
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if os.path.isfile(os.path.join(home, "include", "cuda.h")):
        return home
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"\x7fELF"):
        return None
    for match in re.finditer(rb"(/[^\s\"']*?/bin/nvcc)\b", head):
        candidate = os.path.realpath(match.group(1).decode())
        if os.path.abspath(candidate) != os.path.abspath(real):
            found = _toolkit_from_nvcc(candidate)
            if found:
                return found
    return None


def find_cuda_home():
    """CUDA_HOME / CUDA_PATH when set, else the toolkit of nvcc, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            return value
    nvcc = shutil.which("nvcc")
    if nvcc:
        found = _toolkit_from_nvcc(nvcc)
        if found:
            return found
    for candidate in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None
