"""Configuration of a GlocalCLIP model.

One dataclass holds everything that changes the numbers a model produces. It is saved inside
every checkpoint, so ``test.py`` and ``predict`` rebuild exactly the model that was trained
without repeating any training flag. Each field is declared once, with its help text and allowed
values; the command-line flags are generated from these fields (``apps/flags.py``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from ..settings import check_settings, known_fields_only, setting

MULTILAYER_MODES = ("reference", "snapshot")
IMAGE_SCORE_MODES = ("global", "global+max")
PROMPT_STYLES = ("glocal", "anomalyclip")
PRECISIONS = ("fp32", "bf16", "fp16")
FEW_SHOT_LAYERS = ("selected", "blocks")
FEW_SHOT_IMAGE_TERMS = ("max", "mean")
#: a file with one of these suffixes is a saved few-shot bank (``--reference BANK``), not an image
BANK_SUFFIXES = (".pt", ".pth", ".bank")

#: backbone -> the settings that fit it, used for the fields a caller does not give. The packaged
#: tiny test backbone has 8 vision blocks, 4 text blocks and no pretrained weights.
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"pretrained": None, "features_list": (2, 4, 6, 8), "dpam_layer": 6, "n_ctx": 5, "ab_ctx": 3,
             "depth": 3, "t_n_ctx": 2},
}


#: the flag of :class:`LoadSettings`, named in every refusal of an unsafe file
TRUST_FLAG = "--trust_checkpoint"


@dataclass
class LoadSettings:
    """How the files a command loads are treated (docs/usage.md, "Security: files you load"). Not part
    of a model's config and never saved: trusting a file is a decision about that file, each time."""

    trust_checkpoint: bool = setting(
        False, switch=True,
        help="load a checkpoint or --pretrained file even if it holds Python objects beyond tensors (a pickled "
             "class, a TorchScript archive OpenAI did not publish): loading such a file can run any code in it, so "
             "give this only for files you made or whose source you trust")

    def __post_init__(self) -> None:
        check_settings(self)


def pretrained_source(text: str) -> Optional[str]:
    """A ``--pretrained`` value: 'none' (or 'random', or empty) means random initialisation."""
    return None if text.lower() in ("none", "random", "") else text


@dataclass
class GlocalCLIPConfig:
    """Every field defaults to the original code's value (docs/design.md §1).

    Deviations from the original code are opt-in: ``multilayer="snapshot"``,
    ``cls_ln_post=True``, ``image_score="global+max"``. ``precision`` only affects speed.
    """

    backbone: str = setting("ViT-L-14-336", help="open_clip model name, 'tiny' (the packaged test "
                            "backbone), or an open_clip model-config JSON")
    pretrained: Optional[str] = setting("openai", parse=pretrained_source,
                                        help="open_clip tag ('openai'), a local weights file (e.g. "
                                             "ViT-L-14-336px.pt), or 'none' for random weights")
    image_size: int = setting(518, minimum=1, help="side of the square input in pixels")
    features_list: Tuple[int, ...] = setting((6, 12, 18, 24), parse=int, nargs="+", minimum=1,
                                             help="1-based vision blocks whose patch tokens make the map")
    dpam_layer: int = setting(20, flag="dpam", minimum=1, help="V-V attention in the last dpam-1 blocks")
    n_ctx: int = setting(12, minimum=1, help="learnable context tokens of each normal prompt")
    ab_ctx: int = setting(12, minimum=1, help="extra learnable tokens of each anomalous prompt")
    depth: int = setting(9, minimum=1, help="text blocks reached by the deep prompt tokens (depth-1 sets)")
    t_n_ctx: int = setting(4, minimum=1, help="deep prompt tokens per text block")
    multilayer: str = setting("reference", choices=MULTILAYER_MODES,
                              help="reference: the original's aliased layers; snapshot: each block's own")
    cls_ln_post: bool = setting(False, switch=True,
                                help="apply ln_post to the global feature (the original code did not)")
    image_score: str = setting("global", choices=IMAGE_SCORE_MODES,
                               help="global: the global branch's probability; global+max adds the map's max")
    prompt_style: str = setting("glocal", choices=PROMPT_STYLES,
                                help="prompt layout: glocal, or anomalyclip (AnomalyCLIP's checkpoints)")
    temperature: float = setting(0.07, cli=False, help="softmax temperature of every similarity")
    precision: str = setting("fp32", choices=PRECISIONS,
                             help="dtype of the frozen encoders' matrix products (weights cast once when "
                                  "the model is built); fp32 reproduces the paper, bf16 is faster on CPUs "
                                  "with bf16 units and on GPUs (docs/speed.md)")

    def __post_init__(self) -> None:
        # Blocks are read once each, in block order, as the original's encoder returned them.
        self.features_list = tuple(sorted({int(f) for f in self.features_list}))
        self.validate()

    def validate(self) -> None:
        """Each field's own rule, then the checks across fields that need no backbone (the
        backbone-dependent ones live in ``GlocalCLIP``)."""
        if not self.features_list:
            raise ValueError("features_list must name at least one vision block")
        check_settings(self)
        if self.t_n_ctx > self.n_ctx:
            raise ValueError(f"t_n_ctx ({self.t_n_ctx}) must not exceed n_ctx ({self.n_ctx}): the deep tokens "
                             f"overwrite positions 1..t_n_ctx, which must lie inside the learnable context")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["features_list"] = list(self.features_list)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GlocalCLIPConfig":
        """Build from a saved dict; unknown keys (from a newer version) are refused by name."""
        return cls(**known_fields_only(cls, d, "GlocalCLIPConfig fields"))

    @classmethod
    def for_backbone(cls, **given: Any) -> "GlocalCLIPConfig":
        """The ``given`` fields; the others from the backbone's entry in BACKBONE_DEFAULTS (for
        ``backbone="tiny"``: layers and prompt lengths that fit it, no pretrained weights), else
        the class defaults."""
        backbone = given.get("backbone", cls.backbone)
        return cls.from_dict({**BACKBONE_DEFAULTS.get(backbone, {}), **given})

    def replace(self, **changes: Any) -> "GlocalCLIPConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FewShotSettings:
    """How the reference bank's distances join the zero-shot scores; defaults measured on held-out
    synthetic data (docs/design.md §11). Declared here, torch-free, for the commands'
    flags; the few-shot functions are ``model/few_shot.py``."""

    weight: float = setting(16.0, flag="shot_weight", minimum=0.0,
                            help="weight of the few-shot map (distances (1-cos)/2 averaged over layers) added to "
                                 "the zero-shot map (a sum of 4 layers' probabilities); APRIL-GAN's sum of (1-cos) "
                                 "over 4 layers is 8")
    layers: str = setting("blocks", flag="shot_layers", choices=FEW_SHOT_LAYERS,
                          help="selected: the layers the zero-shot map reads (under multilayer=reference the "
                               "original's shared V-V tensor); blocks: each selected block's own features")
    image_term: str = setting("max", flag="shot_image_term", choices=FEW_SHOT_IMAGE_TERMS,
                              help="what the image score gains from the few-shot map: its max or its mean")

    def __post_init__(self) -> None:
        check_settings(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FewShotSettings":
        return cls(**known_fields_only(cls, d, "few-shot settings"))


def is_bank_name(path: Any) -> bool:
    """Whether ``--reference path`` reads ``path`` as a saved bank (by its suffix, any case)."""
    return os.path.splitext(os.fspath(path))[1].lower() in BANK_SUFFIXES
