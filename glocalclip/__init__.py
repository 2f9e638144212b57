"""glocalclip: GlocalCLIP zero-shot anomaly detection on open_clip (see README.md, docs/design.md).

Layers, imports running one way: ``model`` (torch modules only) <- ``engine`` (training, metrics,
checkpoints) <- ``inference`` (the Detector, predict, evaluate) <- ``deploy`` (ONNX, serve) <- ``apps``
(command lines); ``datasets``, ``files``, ``settings``, ``locks`` are the base layer beneath them.
Names are imported on first use, so ``import glocalclip`` (and ``glocalclip --help``) load no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_PUBLIC = {
    "GlocalCLIPConfig": "glocalclip.model.config",
    "GlocalCLIP": "glocalclip.model.glocalclip",
    "load_model": "glocalclip.engine.checkpoint",
    "Predictor": "glocalclip.inference.predictor",
    "metrics": "glocalclip.engine",
    "OnnxPredictor": "glocalclip.deploy.runtime",
    "export_onnx": "glocalclip.deploy.export",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'glocalclip' has no attribute {name!r}")
