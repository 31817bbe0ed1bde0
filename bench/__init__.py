"""Benchmarks: each module times obelisk against a baseline in the same run and prints ratios."""
