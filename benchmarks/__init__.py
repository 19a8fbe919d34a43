"""Benchmark harness (not tests): training / evaluation / data-loader throughput, peak memory,
FLOP utilisation and bf16 parity of the JoEm DeepLabV3+ pipeline. Run ``python -m benchmarks.run -h``;
see ``docs/benchmarks.md``."""
