"""Benchmarks of lmm_fast: pytest-benchmark suites per op (``pytest benchmarks/``)
and the one-command comparison (``python -m benchmarks.compare``)."""
