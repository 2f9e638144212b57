"""What an exported ONNX file says about itself: its input and output names and the
``metadata_props`` written at export (image size, σ, threshold, config, version, checkpoint hash).

Torch-free: the runtime reads it, the exporter writes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..settings import SettingError

FORMAT = "glocalclip-onnx/1"
INPUT_NAME = "images"  # uint8 [B, S, S, 3], RGB, already resized to S
OUTPUT_NAMES = ("pred_score", "anomaly_map")  # float32 [B] and [B, S, S]
#: how the weight matrices are stored: float32; float16 cast to float32 (``--half``); the blocks'
#: matrices int8, multiplied in int8 (``--int8``). Files of every version say one of these or nothing.
WEIGHT_KINDS = ("float32", "float16", "int8")


def weights_kind(half: bool, int8: bool) -> str:
    """The one rule for ``export``'s storage flags: at most one of them."""
    if half and int8:
        raise SettingError("int8", "{int8} and {half} are two ways to store the weights: give one of them "
                                   "(docs/usage.md, Export)", also=("half",))
    return "int8" if int8 else "float16" if half else "float32"


@dataclass(frozen=True)
class DeployMetadata:
    """The settings an exported file was made with; ``config`` is the model's GlocalCLIPConfig dict."""

    image_size: int
    sigma: float
    threshold: Optional[float]
    config: dict[str, Any]
    version: str
    checkpoint_sha256: str
    weights: str = "float32"  # one of WEIGHT_KINDS
    threshold_source: Optional[str] = None  # in words: "best F1 on the test set of mvtec, σ 8"
    #: the few-shot bank baked in (docs/design.md §11): its settings, how many images, their names, rows
    reference: Optional[dict[str, Any]] = None

    def to_props(self) -> dict[str, str]:
        """As ONNX ``metadata_props`` (strings only); no threshold -> no ``threshold`` key."""
        props = {"format": FORMAT, "image_size": str(self.image_size), "sigma": repr(float(self.sigma)),
                 "config": json.dumps(self.config, sort_keys=True), "glocalclip_version": self.version,
                 "checkpoint_sha256": self.checkpoint_sha256, "weights": self.weights}
        if self.threshold is not None:
            props["threshold"] = repr(float(self.threshold))
        if self.threshold_source:
            props["threshold_source"] = self.threshold_source
        if self.reference is not None:
            props["reference"] = json.dumps(self.reference, sort_keys=True)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "the ONNX file") -> "DeployMetadata":
        if props.get("format") != FORMAT:
            raise ValueError(f"{source} was not written by `glocalclip export` (metadata format "
                             f"{props.get('format')!r}, expected {FORMAT!r}); export the checkpoint with it")
        thr = props.get("threshold")
        return cls(image_size=int(props["image_size"]), sigma=float(props["sigma"]),
                   threshold=None if thr is None else float(thr), config=json.loads(props["config"]),
                   version=props["glocalclip_version"], checkpoint_sha256=props["checkpoint_sha256"],
                   weights=props.get("weights", "float32"), threshold_source=props.get("threshold_source"),
                   reference=json.loads(props["reference"]) if "reference" in props else None)

    @property
    def map_value_range(self) -> tuple[float, float]:
        """The map's full range, 0 .. number of feature layers (each adds a value in [0, 1]), plus a
        baked-in bank's weight (its distances lie in [0, 1])."""
        extra = float(self.reference["settings"]["weight"]) if self.reference is not None else 0.0
        return 0.0, float(len(self.config["features_list"])) + extra
