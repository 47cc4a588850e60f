"""The CMake build of the operator library against LibTorch stays working:
configure, build (CPU kernels), load the library into a fresh process without
the Python package, and check the loss op against the reference."""
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_home():
    spec = importlib.util.spec_from_file_location("_cuda_home", os.path.join(ROOT, "tools", "cuda_home.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_cuda_home()


def _cmake_args():
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is not None:
        # LibTorch's CUDA build looks for the toolkit and nvrtc at configure time.
        home = _cuda_home()
        if home is None:
            pytest.skip("torch has CUDA but no CUDA toolkit was found for LibTorch's CMake config")
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={home}")
        nvrtc = glob.glob(os.path.join(home, "lib64", "libnvrtc.so*"))
        nvrtc += glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib", "libnvrtc.so*"))
        if nvrtc:
            args.append(f"-DCUDA_nvrtc_LIBRARY={os.path.realpath(sorted(nvrtc)[0])}")
    return args


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_builds_and_runs(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    configure = subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *_cmake_args()],
        capture_output=True, text=True, env=env,
    )
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compiled = subprocess.run(
        ["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, env=env
    )
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    library = build / "liblmm_fast_ops.so"
    assert library.exists()
    script = textwrap.dedent(
        f"""
        import importlib.util, torch
        torch.ops.load_library({str(library)!r})
        spec = importlib.util.spec_from_file_location("ref", {os.path.join(ROOT, "src", "lmm_fast", "reference", "loss.py")!r})
        ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
        torch.manual_seed(0)
        sizes = [3, 7, 23]
        psi = [torch.softmax(torch.randn(s, 23), 1) for s in sizes[:-1]]
        psi_t = torch.cat([p.t() for p in psi], 1).contiguous()
        theta = torch.tensor([0.2, 0.3, 0.5])
        logits = torch.randn(11, 33)
        target = torch.randint(0, 23, (11,))
        loss, lse, log_m = torch.ops.lmm_fast.lmm_loss_forward(logits, target, psi_t, theta, sizes, -100)
        expected = ref.lmm_loss_reference(logits.double(), target, psi, theta.double())
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        print("cmake-library-ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0 and "cmake-library-ok" in run.stdout, run.stdout + run.stderr
