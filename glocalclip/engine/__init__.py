"""Running the model: training with the feature cache, zero-shot evaluation, metrics, smoothing,
checkpoints, loaders and torchrun processes. Submodules are imported on first use, so the
settings (``engine.settings``) load without torch."""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["metrics"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
