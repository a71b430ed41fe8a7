"""Horde benchmarks: `make bench` (``python -m benchmarks.run``) runs every part and records its
figures in ``build/bench.json``."""
