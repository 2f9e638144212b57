"""Deployment: one ONNX graph from pixels to score and map (``export_onnx``, needs torch and the
``deploy`` extra), the torch-free runtime that scores with it (``OnnxPredictor``: numpy, Pillow and
onnxruntime only), and ``glocalclip serve`` (``serve.py``, the ``serve`` extra).

Importing this package loads no torch; ``export_onnx`` is imported on first use.
"""
from typing import Any

from .metadata import DeployMetadata
from .runtime import OnnxPredictor

__all__ = ["DeployMetadata", "OnnxPredictor", "export_onnx"]


def __getattr__(name: str) -> Any:
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
