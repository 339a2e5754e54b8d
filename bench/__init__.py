"""Benchmarks of tap latency and throughput."""
