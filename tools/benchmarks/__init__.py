"""Benchmarks, ordinary users of egpt_align: python -m tools.benchmarks.X."""
