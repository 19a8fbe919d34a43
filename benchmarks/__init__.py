"""Benchmark harness (not tests): ``python -m benchmarks.run -h``, ``python -m benchmarks.gpu_acceptance -h``."""
