"""What a checkpoint stores about its backbone, so that it rebuilds without the files it was
built from (docs/design.md §2.1).

A ``--backbone`` given as a JSON path, or an open_clip name whose config a later open_clip version
changes, would otherwise make a checkpoint depend on a file that can move, be edited or vanish.
The record holds the full open_clip model config (the dict itself), its canonical name and where
the weights came from. The weights are the one outside input: a local file is recorded by its
SHA-256, an open_clip tag by the tag, and a model built from the record warns when its weights
are not the recorded ones.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from torch import nn

from .backbone import backbone_from_config, resolve_model_config
from .checkpoint_format import file_sha256

#: the checkpoint entry that holds a :class:`BackboneRecord`
CHECKPOINT_KEY = "backbone"


@dataclass
class BackboneRecord:
    """A backbone as a checkpoint stores it: ``model_config`` is open_clip's config dict, ``name``
    its canonical name (``ViT-L-14-336-quickgelu``, ``tiny``, or the JSON path it came from),
    ``pretrained`` a tag, a weights file or None (random init), and ``weights_sha256`` the file's
    SHA-256 (None for a tag or random weights)."""

    name: str
    model_config: dict[str, Any] = field(repr=False)
    pretrained: Optional[str]
    weights_sha256: Optional[str] = None

    @classmethod
    def resolve(cls, backbone: str, pretrained: Optional[str]) -> "BackboneRecord":
        """The record of ``--backbone`` / ``--pretrained`` as given (the weights not yet hashed)."""
        model_config, name = resolve_model_config(backbone, pretrained)
        return cls(name, model_config, pretrained)

    @property
    def patch_size(self) -> Optional[int]:
        patch = self.model_config.get("vision_cfg", {}).get("patch_size")
        return patch if isinstance(patch, int) else None

    def is_weights_file(self) -> bool:
        """Whether the weights were (or are to be) read from a local file rather than a tag."""
        return self.pretrained is not None and (self.weights_sha256 is not None or os.path.isfile(self.pretrained))

    def hashed(self) -> "BackboneRecord":
        """This record with the SHA-256 of its weights file as the file is now. A file the
        record names (it has a hash) but that is not here is refused with what to pass."""
        if not self.is_weights_file():
            return replace(self, weights_sha256=None)
        if not os.path.isfile(self.pretrained):
            raise FileNotFoundError(
                f"the pretrained weights file {self.pretrained} that the checkpoint was trained with is not "
                f"here; pass --pretrained PATH to a copy of it (SHA-256 {self.weights_sha256})")
        return replace(self, weights_sha256=file_sha256(self.pretrained))

    def build(self, trust: bool = False) -> nn.Module:
        """The frozen CLIP this record describes (its weights read from ``pretrained``; ``trust``: a
        weights file that could run code is loaded all the same, see ``checkpoint_format.safe_load``)."""
        return backbone_from_config(self.model_config, self.name, self.pretrained, trust=trust)

    def identity(self) -> str:
        """What the weights are, in words: compared between a checkpoint and a load."""
        if self.pretrained is None:
            return "random weights"
        if self.weights_sha256 is not None:
            return f"weights file with SHA-256 {self.weights_sha256}"
        return f"open_clip weights {self.name}:{self.pretrained}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model_config": copy.deepcopy(self.model_config), "pretrained": self.pretrained,
                "weights_sha256": self.weights_sha256}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BackboneRecord":
        return cls(str(d["name"]), copy.deepcopy(dict(d["model_config"])), d.get("pretrained"),
                   d.get("weights_sha256"))

    @classmethod
    def of_checkpoint(cls, ckpt: Mapping[str, Any], overrides: Mapping[str, Any]) -> Optional["BackboneRecord"]:
        """The backbone a checkpoint records, or None where it records none (older checkpoints,
        the original code's) or ``overrides`` name a ``backbone`` (that is then resolved as given)."""
        stored = ckpt.get(CHECKPOINT_KEY)
        if not isinstance(stored, Mapping) or "backbone" in overrides:
            return None
        return cls.from_dict(stored)

    @classmethod
    def wanted(cls, backbone: str, pretrained: Optional[str], recorded: Optional["BackboneRecord"]) -> "BackboneRecord":
        """The backbone to build, weights not yet hashed: a checkpoint's ``recorded`` architecture with
        the weights ``pretrained``, else ``backbone`` resolved as given."""
        return recorded.for_weights(pretrained) if recorded is not None else cls.resolve(backbone, pretrained)

    def for_weights(self, pretrained: Optional[str]) -> "BackboneRecord":
        """This architecture with the weights ``pretrained`` (a ``--pretrained`` given at load time:
        the same weights elsewhere on this machine, say); the recorded hash goes with the old source."""
        return self if pretrained == self.pretrained else replace(self, pretrained=pretrained, weights_sha256=None)


def warn_if_other_weights(recorded: BackboneRecord, loaded: BackboneRecord) -> None:
    """Warn when the weights just loaded are not those the checkpoint records: its prompts were
    trained against other features, so its scores may differ from those it was tested with."""
    if recorded.identity() == loaded.identity():
        return
    where = f" ({loaded.pretrained})" if loaded.is_weights_file() else ""
    warnings.warn(f"the backbone's pretrained weights differ from those the checkpoint was trained with: "
                  f"checkpoint {recorded.identity()}, now {loaded.identity()}{where}; its scores may differ from "
                  f"the ones measured with it", stacklevel=2)


def checkpoint_entry(record: Optional[BackboneRecord]) -> dict[str, Any]:
    """``{"backbone": record}`` for a checkpoint dict, or nothing where the backbone is unknown
    (a caller passed in its own CLIP)."""
    return {} if record is None else {CHECKPOINT_KEY: record.to_dict()}
