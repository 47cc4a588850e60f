"""``lmm-fast compare`` (also ``python -m lmm_fast.compare``): the LMM against
the flat softmax, on speed and on real data. A job built on the library; the
library never imports it.

* :mod:`~lmm_fast.compare.speed` — part 1, speed and memory against PyTorch;
* :mod:`~lmm_fast.compare.datasets` — the data (ICD-10-CM, or the user's own);
* :mod:`~lmm_fast.compare.runs` — one training run and its metrics;
* :mod:`~lmm_fast.compare.protocol` — part 2, the settings of the paper's
  Tables I and IV over seeds;
* :mod:`~lmm_fast.compare.variants` — the remedies (``--remedies``);
* :mod:`~lmm_fast.compare.decisions` — CRM and hedging of the flat and LMM
  posteriors (``lmm_fast.decide``), in the semantic and the visual tree;
* :mod:`~lmm_fast.compare.report` — summaries, tables and files;
* :mod:`~lmm_fast.compare.command` — the command line.

docs/compare.md describes the protocol.
"""
from __future__ import annotations

from lmm_fast.compare.command import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
