"""``glocalclip export``: the whole detector as one ONNX graph, from uint8 pixels to score and map.

After training the text features are constants, so the detector is the vision tower plus a few
matrix products and a blur (docs/design.md §4). :class:`DeployedDetector` is exactly that: it
normalises the pixels as ``datasets/preprocess.py`` does, runs the dual-path vision tower with the
positional table already resized for S (§2.2), scores with the stored text features (no text tower
in the file), and smooths the map with σ as ``test.py`` does (scipy's "reflect" padding by index
gathers, then two 1-D convolutions, float32). PyTorch's own exporter writes it
(``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``), with an example batch of 2 so that
the batch dimension stays dynamic.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .. import __version__
from ..datasets.preprocess import normalize_image
from ..engine.smoothing import gaussian_kernel1d, separable_smooth
from ..model.scoring import final_image_score
from ..apps.flags import add_load_flags, add_settings, new_parser, settings_from_args, trusted
from ..settings import check_settings, setting
from .metadata import INPUT_NAME, OUTPUT_NAMES, DeployMetadata

PROTOBUF_LIMIT = 2 ** 31  # one ONNX protobuf holds at most 2 GiB: larger weights go to external data
GRAPH_HEADROOM = 2 ** 27  # room left for the graph itself beside the weights
EXPORT_EXTRA_HINT = "exporting needs the deploy extra: pip install 'glocalclip[deploy]' (onnx, onnxscript, onnxruntime)"


class DeployedDetector(nn.Module):
    """uint8 RGB images [B, S, S, 3] -> (pred_score [B], anomaly_map [B, S, S]), both float32, as
    ``test.py`` / ``predict`` compute them with σ ``sigma`` (σ <= 0: no smoothing).

    Only the vision tower is a submodule, so only its weights enter the graph; the text features,
    computed once here, are buffers. The model's own forward is kept as a plain callable: it reads
    ``cfg`` and the vision tower, never the text tower, when text features are given.
    """

    def __init__(self, model: nn.Module, sigma: float):
        super().__init__()
        self.visual = model.visual  # the frozen vision tower, shared, not copied
        self.image_score = model.cfg.image_score
        self._score_images = model.forward
        with torch.no_grad():
            global_text, local_text = model.encode_text()
        self.register_buffer("global_text", global_text.detach().clone())  # [2, E]
        self.register_buffer("local_text", local_text.detach().clone())  # [2, E]
        grid = model.cfg.image_size // model.visual.patch_size
        model.visual.pos_embed((grid, grid))  # resize the positional table for S now: a constant in the graph
        self.smooth = float(sigma) > 0
        kernel = gaussian_kernel1d(sigma) if self.smooth else torch.ones(1)
        self.register_buffer("kernel", kernel)  # [2r+1] float32

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_image(images.permute(0, 3, 1, 2))  # [B, 3, S, S]
        out = self._score_images(x, text=(self.global_text, self.local_text))
        amap = separable_smooth(out["anomaly_map"], self.kernel) if self.smooth else out["anomaly_map"]
        if self.image_score == "global+max":
            return final_image_score(out["global_score"], amap, self.image_score), amap
        return out["image_score"], amap


def _load_model(checkpoint: str | os.PathLike, trust: bool = False, **overrides: Any) -> tuple[nn.Module, dict]:
    """The checkpoint's model in eval mode, and its test record (threshold and σ ``test.py`` stored)."""
    from ..engine.checkpoint import load_model_and_checkpoint, stored_test_record

    model, ckpt = load_model_and_checkpoint(checkpoint, trust=trust, **overrides)
    return model.eval(), stored_test_record(checkpoint, ckpt)


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, sigma: Optional[float] = None,
                half: bool = False, image_size: Optional[int] = None, threshold: Optional[float] = None,
                trust: bool = False, **overrides: Any) -> DeployMetadata:
    """Write ``out`` (and ``out.data`` when the weights pass 2 GB): one ONNX graph from uint8 images
    [B, S, S, 3] to ``pred_score`` [B] and ``anomaly_map`` [B, S, S]. ``sigma`` defaults to the σ the
    checkpoint was tested with, ``image_size`` to its config's, ``threshold`` to its stored one.
    ``half`` stores the weight matrices as float16 (computed in float32). ``trust``: load a checkpoint
    that could run code (``--trust_checkpoint``). Returns the metadata."""
    from ..engine.checkpoint import file_sha256, tested_sigma, threshold_source

    _require_exporter()
    if image_size is not None:
        overrides["image_size"] = int(image_size)
    model, record = _load_model(checkpoint, trust, **{**overrides, "precision": "fp32"})
    sigma = tested_sigma(record) if sigma is None else float(sigma)
    meta = DeployMetadata(image_size=int(model.cfg.image_size), sigma=sigma,
                          threshold=(record or {}).get("image_score") if threshold is None else float(threshold),
                          config=model.cfg.to_dict(), version=__version__,
                          checkpoint_sha256=file_sha256(checkpoint), half=half,
                          threshold_source=("given at export" if threshold is not None else
                                            threshold_source(record) if record else None))
    program = _export_program(DeployedDetector(model, sigma).eval(), meta.image_size)
    if half:
        from .half import store_weights_half

        store_weights_half(program.model)
    _strip_export_traces(program.model)
    program.model.metadata_props.update(meta.to_props())
    for old in exported_files(out)[1:]:  # external data of an earlier export to this name
        old.unlink()
    program.save(os.fspath(out), external_data=_weight_bytes(program.model) > PROTOBUF_LIMIT - GRAPH_HEADROOM)
    return meta


def _require_exporter() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{EXPORT_EXTRA_HINT} ({e})") from e


def _export_program(detector: DeployedDetector, image_size: int):
    """torch.onnx's dynamo exporter on an example batch of 2 (a batch of 1 would fix the batch
    dimension at 1), with the batch dimension declared dynamic."""
    example = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        return torch.onnx.export(detector, (example,), dynamo=True, input_names=[INPUT_NAME],
                                 output_names=list(OUTPUT_NAMES), dynamic_shapes={"images": {0: batch}},
                                 optimize=True, verbose=False)


def _strip_export_traces(ir_model) -> None:
    """Drop the exporter's per-node notes (Python stack traces with this machine's paths, FX names):
    a deployed file should not carry them, and they are most of a small model's graph bytes."""
    for node in ir_model.graph.all_nodes():
        node.metadata_props.clear()
        for value in node.outputs:
            value.metadata_props.clear()


def exported_files(out: str | os.PathLike) -> list[Path]:
    """The ONNX file and, when its weights went to external data, ``OUT.data`` beside it."""
    out = Path(out)
    data = out.with_name(out.name + ".data")
    return [out, data] if data.is_file() else [out]


def _weight_bytes(ir_model) -> int:
    return sum(v.const_value.nbytes for v in ir_model.graph.initializers.values() if v.const_value is not None)


# ---------------------------------------------------------------------------- CLI
@dataclass
class ExportSettings:
    """``glocalclip export``'s options (each a flag)."""

    checkpoint: str = setting("", positional=True, help="our checkpoint (convert an original-format one first: "
                                                        "glocalclip convert)")
    out: str = setting("", required=True, help="the ONNX file to write (weights over 2 GB go beside it, in OUT.data)")
    sigma: Optional[float] = setting(None, parse=float, help="Gaussian smoothing of the map inside the graph",
                                     default_text="the σ test.py scored the checkpoint with, else 8")
    half: bool = setting(False, switch=True, help="store the weight matrices as float16: about half the file; "
                                                  "computed in float32, so scores move by ~1e-4")
    image_size: Optional[int] = setting(None, parse=int, minimum=1, help="input side S fixed in the file; the "
                                        "positional table is resized for it", default_text="the checkpoint's")
    threshold: Optional[float] = setting(None, parse=float, help="label threshold stored in the file",
                                         default_text="the one test.py stored beside the checkpoint, if any")
    pretrained: Optional[str] = setting(None, help="CLIP weights to rebuild the backbone from, when the "
                                                   "checkpoint's are not at hand (an open_clip tag or a file)",
                                        default_text="the checkpoint's")

    def __post_init__(self) -> None:
        check_settings(self)


def export_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip export", "Export a checkpoint as one ONNX graph: uint8 images [B, S, S, 3] in, "
                   "image score [B] and smoothed anomaly map [B, S, S] out. Needs pip install 'glocalclip[deploy]'.")
    add_settings(p, ExportSettings)
    add_load_flags(p)
    return p


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    args = export_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    options = asdict(settings_from_args(ExportSettings, args))
    checkpoint, out, pretrained = options.pop("checkpoint"), options.pop("out"), options.pop("pretrained")
    t0 = time.perf_counter()
    overrides = {} if pretrained is None else {"pretrained": pretrained}
    meta = export_onnx(checkpoint, out, **options, trust=trusted(args), **overrides)
    size = sum(p.stat().st_size for p in exported_files(out))
    thr = "none" if meta.threshold is None else f"{meta.threshold:.4g}"
    print(f"export: {out} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s): images uint8 "
          f"[B, {meta.image_size}, {meta.image_size}, 3] -> pred_score [B], anomaly_map [B, {meta.image_size}, "
          f"{meta.image_size}]; σ {meta.sigma:g}, threshold {thr}")
    return 0
