"""Benchmarks, ordinary users of the library: python -m tools.benchmarks.X."""
