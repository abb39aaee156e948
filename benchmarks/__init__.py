"""Benchmarks: the per-backbone latency/accuracy table and load tests against the service.

Not implemented yet (issue #5).
"""
