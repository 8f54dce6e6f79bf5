"""Benchmarks that docs quote. Each prints ratios against a reference
measured in the same run and writes JSON under ``bench/results/``."""
