"""Configuration of a GlocalCLIP model.

One dataclass holds everything that changes the numbers a model produces. It is saved inside
every checkpoint, so ``test.py`` and ``predict`` rebuild exactly the model that was trained
without repeating any training flag.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

MULTILAYER_MODES = ("reference", "snapshot")
IMAGE_SCORE_MODES = ("global", "global+max")
PROMPT_STYLES = ("glocal", "anomalyclip")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class GlocalCLIPConfig:
    """Every field defaults to the original code's value (DESIGN.md §1).

    Deviations from the original code are opt-in: ``multilayer="snapshot"``,
    ``cls_ln_post=True``, ``image_score="global+max"``. ``precision`` only affects speed.
    """

    backbone: str = "ViT-L-14-336"
    pretrained: Optional[str] = "openai"
    image_size: int = 518
    features_list: Tuple[int, ...] = (6, 12, 18, 24)
    dpam_layer: int = 20
    n_ctx: int = 12
    ab_ctx: int = 12
    depth: int = 9
    t_n_ctx: int = 4
    multilayer: str = "reference"
    cls_ln_post: bool = False
    image_score: str = "global"
    prompt_style: str = "glocal"
    temperature: float = 0.07
    precision: str = "fp32"

    def __post_init__(self) -> None:
        # Blocks are read once each, in block order, as the original's encoder returned them.
        self.features_list = tuple(sorted({int(f) for f in self.features_list}))
        self.validate()

    def validate(self) -> None:
        """Checks that need no backbone; the backbone-dependent ones live in ``GlocalCLIP``."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        need(self.image_size > 0, f"image_size must be positive, got {self.image_size}")
        need(len(self.features_list) > 0, "features_list must name at least one vision block")
        need(all(f >= 1 for f in self.features_list),
             f"features_list holds 1-based block numbers (>= 1), got {list(self.features_list)}")
        need(self.dpam_layer >= 1, f"dpam_layer must be >= 1, got {self.dpam_layer}")
        need(self.n_ctx >= 1 and self.ab_ctx >= 1, "n_ctx and ab_ctx must be >= 1")
        need(self.depth >= 1, f"depth must be >= 1, got {self.depth}")
        need(self.t_n_ctx >= 1, f"t_n_ctx must be >= 1, got {self.t_n_ctx}")
        need(self.t_n_ctx <= self.n_ctx,
             f"t_n_ctx ({self.t_n_ctx}) must not exceed n_ctx ({self.n_ctx}): the deep tokens "
             f"overwrite positions 1..t_n_ctx, which must lie inside the learnable context")
        need(self.multilayer in MULTILAYER_MODES,
             f"multilayer must be one of {MULTILAYER_MODES}, got {self.multilayer!r}")
        need(self.image_score in IMAGE_SCORE_MODES,
             f"image_score must be one of {IMAGE_SCORE_MODES}, got {self.image_score!r}")
        need(self.prompt_style in PROMPT_STYLES,
             f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")
        need(self.precision in PRECISIONS,
             f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.temperature > 0, "temperature must be positive")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features_list"] = list(self.features_list)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GlocalCLIPConfig":
        """Build from a saved dict; unknown keys (from a newer version) are refused by name."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown GlocalCLIPConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "GlocalCLIPConfig":
        return dataclasses.replace(self, **changes)
