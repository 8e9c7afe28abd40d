"""Benchmarks: each prints a ratio against a bound measured in the same run."""
