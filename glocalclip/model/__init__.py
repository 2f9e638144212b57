"""The detector as torch modules: configuration, backbone, the dual-path vision tower, the text
tower with deep prompts, the prompt learner, scoring and losses. No argparse, no loops over data.

``GlocalCLIP`` is imported on first use, so ``model.config`` (and the command line that reads it)
loads without torch."""
from typing import Any

from .config import GlocalCLIPConfig

__all__ = ["GlocalCLIPConfig", "GlocalCLIP"]


def __getattr__(name: str) -> Any:
    if name == "GlocalCLIP":
        from .glocalclip import GlocalCLIP

        return GlocalCLIP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
