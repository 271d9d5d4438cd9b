"""ONNX export, parity checks and latency benchmarks (the export issue fills this package)."""
