"""Benchmarks, run from the repository root: `python -m bench.aggregation`, `python -m bench.codec`,
`python -m bench.round_overhead`, `python -m bench.memory`, `python -m bench.train_step`; figures in bench/README.md.
"""
