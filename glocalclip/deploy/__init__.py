"""Deployment: one ONNX graph from pixels to score and map (``export.py``: ``export_onnx``, needs torch
and the ``deploy`` extra), the torch-free runtime that scores with it (``runtime.py``:
``OnnxPredictor``, numpy, Pillow and onnxruntime only), and the web service (``serve.py``, the
``serve`` extra). Their command lines are ``apps/export_cli.py`` and ``apps/serve_cli.py``.

Importing this package loads no torch; its names load on first use, so that a command's flags
(``apps/parsers.py`` reads ``metadata.weights_kind``) load neither numpy nor Pillow.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DeployMetadata", "OnnxPredictor"]
_HOME = {"DeployMetadata": ".metadata", "OnnxPredictor": ".runtime"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
