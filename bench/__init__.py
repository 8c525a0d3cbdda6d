"""Benchmarks, run from the repository root: `python -m bench.aggregation`, `python -m bench.codec`."""
