"""The ``torch.ops.lmm_fast`` operators, one module per op family, each with
its typed wrappers, fake kernels and autograd formulas:

* :mod:`lmm_fast.ops.loss` — the fused LMM loss (forward, backward);
* :mod:`lmm_fast.ops.predict` — class probabilities and top-k (tree and dense
  Ψ), gathered scores for the coarse-to-fine search;
* :mod:`lmm_fast.ops.gibbs` — the collapsed Gibbs sampler and the updates of
  Ω and Ψ it drives.
* :mod:`lmm_fast.ops.linear_loss` — the head's linear layer and the loss
  over row chunks (no kernel of its own: GEMMs and the loss kernels).

The same stem names the CPU kernel (``csrc/cpu/<stem>_cpu.cpp``), the CUDA
kernel (``csrc/cuda/<stem>_cuda.cu``), the oracle
(:mod:`lmm_fast.reference`), the tests and the benchmark.
"""
from __future__ import annotations

from lmm_fast.ops.library import accumulate_dtype, has_cuda_kernels
from lmm_fast.ops import gibbs, linear_loss, loss, predict

__all__ = ["accumulate_dtype", "has_cuda_kernels", "gibbs", "linear_loss", "loss", "predict"]
