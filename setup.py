"""Build script for lmm_fast's C++/CUDA operator library.

The CPU kernels always build. The CUDA kernels build when torch has CUDA and
an nvcc is found (or FORCE_CUDA=1), for the architectures in
TORCH_CUDA_ARCH_LIST (default 8.0;9.0). FORCE_CUDA=0 forces a CPU-only build.
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import time.
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    BuildExtension,
    CppExtension,
    CUDAExtension,
)


def want_cuda():
    force = os.environ.get("FORCE_CUDA")
    if force == "0":
        return False
    if force == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extensions():
    with_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("LMM_FAST_PYTHON_MODULE", None)]
    cxx_flags = ["-O3", "-fopenmp"]
    if sys.platform == "darwin":
        cxx_flags.remove("-fopenmp")
    extra_compile_args = {"cxx": cxx_flags}
    extra_link_args = [] if sys.platform == "darwin" else ["-fopenmp"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("LMM_FAST_WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]
        ext = CUDAExtension
    else:
        ext = CppExtension
    return [
        ext(
            "lmm_fast._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    ]


setup(
    packages=find_packages(include=["lmm_fast", "lmm_fast.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
