"""glocalclip: GlocalCLIP zero-shot anomaly detection on open_clip (see DESIGN.md / README.md)."""
__version__ = "0.1.0"

from .config import GlocalCLIPConfig  # noqa: E402
from .model import GlocalCLIP  # noqa: E402

__all__ = ["GlocalCLIPConfig", "GlocalCLIP", "__version__"]
