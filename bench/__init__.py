"""Benchmarks (run by hand, never in timed tests)."""
