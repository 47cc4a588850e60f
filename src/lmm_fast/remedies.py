"""Deprecated: the remedies' former home, kept for one release. Import from
their modules instead: :mod:`lmm_fast.theta` (θ schedules and the gate),
:mod:`lmm_fast.calibration`, :func:`lmm_fast.predict.path_score_proba`,
:mod:`lmm_fast.adaptation.guard` and :func:`lmm_fast.train.fit_lmm`
(``head=``, ``schedule=``, ``gate=``; it replaces ``fit_remedy``)."""
from __future__ import annotations

import warnings

from lmm_fast.adaptation.guard import GuardedGibbsAdapter, empty_groups, scaled_beta
from lmm_fast.calibration import apply_temperature, fit_temperature, fit_test_theta
from lmm_fast.predict import path_score_proba
from lmm_fast.theta import ThetaGate, ThetaSchedule, coarse_to_fine_theta

warnings.warn("lmm_fast.remedies is deprecated: import from lmm_fast.theta, lmm_fast.calibration, "
              "lmm_fast.predict, lmm_fast.adaptation.guard and lmm_fast.train instead",
              DeprecationWarning, stacklevel=2)

__all__ = ["ThetaSchedule", "coarse_to_fine_theta", "ThetaGate", "fit_temperature", "apply_temperature",
           "fit_test_theta", "path_score_proba", "scaled_beta", "empty_groups", "GuardedGibbsAdapter"]
