"""Benchmarks: the per-backbone latency/size/accuracy table (``sweep``, ``report``), load tests against the live
service and the plain baseline server (``loadtest``, ``locustfile``, ``baseline_server``), and the batch-prediction,
training-memory and soak benchmarks. Every figure is measured side by side in one run.
"""
