"""The detector as torch modules: configuration, backbone, the dual-path vision tower, the text
tower with deep prompts, the prompt learner, scoring and losses. No argparse, no loops over data."""
from .config import GlocalCLIPConfig
from .glocalclip import GlocalCLIP

__all__ = ["GlocalCLIPConfig", "GlocalCLIP"]
