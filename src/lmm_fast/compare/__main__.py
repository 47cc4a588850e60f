"""``python -m lmm_fast.compare [options]``: the same as ``lmm-fast compare``."""
import sys

from lmm_fast.compare.command import main

sys.exit(main())
