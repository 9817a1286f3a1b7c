"""Benchmarks behind `incseg bench`: continual strategies, scale-out, inference latency."""
