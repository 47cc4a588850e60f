"""``python -m lmm_fast``: the same as the ``lmm-fast`` console script."""

from lmm_fast.cli import main

raise SystemExit(main())
