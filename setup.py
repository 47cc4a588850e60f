"""Build script for lmm_fast's C++/CUDA operator library.

The CPU kernels always build. The CUDA kernels build when torch has CUDA and
an nvcc is found (or FORCE_CUDA=1), for the architectures in
TORCH_CUDA_ARCH_LIST (default 8.0;9.0). FORCE_CUDA=0 forces a CPU-only build.
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_cuda_home_finder():
    spec = importlib.util.spec_from_file_location("_lmm_cuda_home", os.path.join(ROOT, "tools", "cuda_home.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home


find_cuda_home = _load_cuda_home_finder()
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
    package_dir={"": "src"},
    packages=find_packages("src", include=["lmm_fast", "lmm_fast.*"]),
    package_data={"lmm_fast": ["py.typed"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
