"""``python -m benchmarks.compare [options]``: the same as ``lmm-fast compare``.

Speed and memory of the fused ops against PyTorch, and flat softmax against
the LMM variants on real data (ICD-10-CM by default, or ``--features X.npy
--labels y.npy``). ``--help`` lists the options; docs/compare.md the protocol.
"""
from __future__ import annotations

import sys

from lmm_fast.compare import main

if __name__ == "__main__":
    sys.exit(main())
