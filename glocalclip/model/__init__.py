"""The detector as torch modules: configuration, backbone, the dual-path vision tower, the text
tower with deep prompts, the prompt learner, scoring and losses. No argparse, no loops over data.

``GlocalCLIP`` is imported on first use, so reading the config (``model.config``, e.g. for a
command's ``--help``) does not load torch."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GlocalCLIPConfig", "GlocalCLIP"]
_HOME = {"GlocalCLIPConfig": ".config", "GlocalCLIP": ".glocalclip"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
