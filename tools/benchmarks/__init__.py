"""Benchmarks: ordinary users of the library."""
