"""Benchmarks: each prints a table and returns (and can write) its figures as JSON."""
