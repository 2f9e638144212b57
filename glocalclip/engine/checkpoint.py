"""Checkpoint files: loading any supported checkpoint into a model (:func:`load_model`), writing ours
(through ``glocalclip.files``: atomic, normal permissions, one message per I/O error), and the
threshold sidecar that ``test.py`` writes beside a checkpoint instead of rewriting it. The formats
themselves are ``model/checkpoint_format.py``.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..files import write_json, write_torch

from ..model.checkpoint_format import file_sha256, read_checkpoint
from ..model.glocalclip import GlocalCLIP, model_from_checkpoint
from .settings import PAPER_SIGMA

THRESHOLD_SUFFIX = ".threshold.json"


# ---------------------------------------------------------------------------- loading
def load_model_and_checkpoint(source: str | os.PathLike | dict, clip: Optional[torch.nn.Module] = None,
                              trust: bool = False, **overrides: Any) -> tuple[GlocalCLIP, dict]:
    """:func:`load_model`, also returning the checkpoint dict (its ``train_config``, ``epoch``, ...)."""
    ckpt = read_checkpoint(source, trust)
    return model_from_checkpoint(ckpt, clip, overrides, trust), ckpt


def load_model(source: str | os.PathLike | dict, clip: Optional[torch.nn.Module] = None, trust: bool = False,
               **overrides: Any) -> GlocalCLIP:
    """The model of a checkpoint: ours (config and backbone inside, so it rebuilds without the
    backbone's JSON; ``overrides`` change fields, e.g. ``pretrained`` pointing at a local copy of
    the weights, which are checked against the recorded SHA-256), or an original GlocalCLIP /
    AnomalyCLIP one (prompt shapes read off its tensors, the rest from ``overrides``, else the
    backbone's defaults). Pass ``clip`` to reuse a backbone you built.

    Loading runs no code from the files: a checkpoint or weights file that holds Python objects
    beyond tensors is refused (CheckpointError) unless ``trust=True``, the ``--trust_checkpoint``
    flag; one of ours whose contents fail their recorded SHA-256 is refused whatever ``trust`` says
    (docs/usage.md, "Security: files you load")."""
    return load_model_and_checkpoint(source, clip, trust, **overrides)[0]


# ---------------------------------------------------------------------------- writing
def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save ``obj`` to ``path`` atomically (the argument order of ``torch.save``)."""
    return write_torch(path, obj)


# ---------------------------------------------------------------------------- threshold sidecar
def threshold_path(checkpoint: str | os.PathLike) -> Path:
    """``epoch_15.pth`` -> ``epoch_15.pth.threshold.json``."""
    return Path(os.fspath(checkpoint) + THRESHOLD_SUFFIX)


def write_threshold(checkpoint: str | os.PathLike, image_score: float, *, sigma: float,
                    image_size: Optional[int] = None, dataset: Optional[str] = None,
                    data_path: Optional[str] = None) -> Path:
    """Store how ``checkpoint`` was tested beside it (the checkpoint is left untouched): the F1-max
    image-score threshold, the σ of the maps it was measured on, the image size, where it was
    measured and how it was derived, plus the checkpoint's SHA-256, so that a sidecar outliving its
    checkpoint is recognised as stale. :class:`TestRecord` reads it back."""
    record = {"image_score": float(image_score), "sigma": float(sigma), "image_size": image_size,
              "dataset": dataset, "data_path": data_path, "derived": "F1-max",
              "checkpoint": Path(checkpoint).name, "checkpoint_sha256": file_sha256(checkpoint)}
    path = threshold_path(checkpoint)
    write_json(path, record)
    return path


def threshold_source(record: dict[str, Any]) -> str:
    """Where a stored threshold comes from, in words: ``best F1 on the test set of mvtec, σ 8`` (the
    dataset, or for folder-mode data its folder's name, and the smoothing of the maps it was measured on)."""
    data = record.get("dataset") or Path(str(record.get("data_path") or "")).name
    sigma = record.get("sigma")
    return (f"best F1 on the test set of {data}" if data else "best F1 on a test set, stored by test.py") + \
        ("" if sigma is None else f", σ {float(sigma):g}")


def read_threshold(checkpoint: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The sidecar record of ``checkpoint`` (see :func:`write_threshold`), or None when there is
    none, it cannot be read, or it belongs to other checkpoint contents (a warning says which)."""
    path = threshold_path(checkpoint)
    if not path.is_file() or not Path(checkpoint).is_file():
        return None
    try:
        record = json.loads(path.read_text())
        image_score = float(record["image_score"])
        TestRecord.of(record)  # its σ and image size read as numbers too
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"ignoring the threshold file {path}: it cannot be read ({e})")
        return None
    if record.get("checkpoint_sha256") != file_sha256(checkpoint):
        warnings.warn(f"ignoring the threshold file {path}: it was written for other contents of "
                      f"{Path(checkpoint).name}; run test.py on the checkpoint again")
        return None
    return {**record, "image_score": image_score}


@dataclass(frozen=True)
class TestRecord:
    """How a checkpoint was tested, as every route reads it (predict, export, serve, the API): the
    threshold, the σ of the maps it was measured on (None: a record too old to say), the image
    size, and how it was derived (``source``, in words)."""

    __test__ = False  # not a pytest test class

    threshold: float
    sigma: Optional[float]
    image_size: Optional[int]
    source: str

    @classmethod
    def of(cls, record: dict[str, Any]) -> "TestRecord":
        size = record.get("image_size")
        return cls(threshold=float(record["image_score"]),
                   sigma=None if record.get("sigma") is None else float(record["sigma"]),
                   image_size=None if size is None else int(size), source=threshold_source(record))


def stored_test_record(checkpoint: str | os.PathLike | dict, ckpt: dict) -> Optional[TestRecord]:
    """What ``test.py`` stored for a checkpoint: the sidecar beside it if it belongs to these
    contents, else the record older versions embedded in the checkpoint, else None."""
    record = None if isinstance(checkpoint, dict) else read_threshold(checkpoint)
    if record is not None:
        return TestRecord.of(record)
    embedded = ckpt.get("threshold") if isinstance(ckpt, dict) else None
    if isinstance(embedded, dict) and embedded.get("image_score") is not None:
        return TestRecord.of(embedded)
    return None


def sigma_for(record: Optional[TestRecord], given: Optional[float] = None) -> float:
    """The one rule for σ, on every route: the σ asked for; else the σ the stored threshold was
    measured with, so that labels and maps belong to each other; else the paper's (docs/design.md §4)."""
    if given is not None:
        return float(given)
    if record is not None and record.sigma is not None:
        return record.sigma
    return PAPER_SIGMA


def threshold_for(record: Optional[TestRecord], given: Optional[float], few_shot: bool, sigma: float,
                  image_size: int, given_source: str = "given") -> tuple[Optional[float], str]:
    """The one rule for the label threshold, on every route: (threshold, where it came from). The one
    asked for; else the one test.py stored, when the scores are made as it measured them: not few-shot
    scores (docs/design.md §11, another scale), and the same σ and image size. Otherwise none, and no
    labels, with a warning that says why."""
    if given is not None or record is None:
        return given, given_source
    if few_shot:
        return None, "none: the stored threshold is zero-shot, these scores few-shot"
    tested = (record.sigma, record.image_size)
    now = (sigma if record.sigma is not None else None, image_size if record.image_size is not None else None)
    if tested != now:
        at = "" if record.image_size is None else f" at {record.image_size} px"
        now_at = "" if record.image_size is None else f" at {image_size} px"
        why = (f"the stored threshold was measured with σ {record.sigma}{at}, these scores use σ {sigma}{now_at}; "
               f"give a threshold (--threshold) to label them")
        warnings.warn(why)
        return None, f"none: {why}"
    return record.threshold, record.source
