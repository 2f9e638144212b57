"""glocalclip: GlocalCLIP zero-shot anomaly detection on open_clip (see DESIGN.md / README.md)."""
__version__ = "0.1.0"

from .config import GlocalCLIPConfig  # noqa: E402
from .model import GlocalCLIP  # noqa: E402

__all__ = ["GlocalCLIPConfig", "GlocalCLIP", "Predictor", "__version__"]


def __getattr__(name: str):
    if name == "Predictor":  # imported on first use: glocalclip.Predictor.from_checkpoint(...)
        from .predict import Predictor

        return Predictor
    raise AttributeError(f"module 'glocalclip' has no attribute {name!r}")
