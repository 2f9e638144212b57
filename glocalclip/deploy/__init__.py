"""Deployment: one ONNX graph from pixels to score and map (``export.py``: ``export_onnx``, needs torch
and the ``deploy`` extra), the torch-free runtime that scores with it (``runtime.py``:
``OnnxPredictor``, numpy, Pillow and onnxruntime only), and the web service (``serve.py``, the
``serve`` extra). Their command lines are ``apps/export_cli.py`` and ``apps/serve_cli.py``.

Importing this package loads no torch.
"""
from .metadata import DeployMetadata
from .runtime import OnnxPredictor

__all__ = ["DeployMetadata", "OnnxPredictor"]
