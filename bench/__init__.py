"""Benchmarks of tap latency and throughput (issue 6)."""
