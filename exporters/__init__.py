"""ONNX export, parity checks and latency benchmarks: `export_onnx`, `exporters.verify`, `exporters.bench`."""

from .onnx_export import ExportConfig, export_onnx

__all__ = ["ExportConfig", "export_onnx"]
