"""``glocalclip export``: the command line of ``deploy/export.py`` (one ONNX graph from image to
score and map). The checkpoint and σ are the shared :class:`ModelSettings`' fields."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from ..deploy.export import export_onnx, exported_files
from ..inference.settings import ModelSettings
from ..settings import check_settings, setting
from .flags import add_load_flags, add_reference_flags, add_settings, new_parser, reference_of, settings_from_args, trusted


@dataclass
class ExportSettings:
    """``glocalclip export``'s own options (each a flag); the model is :class:`ModelSettings`'."""

    out: str = setting("", required=True, help="the ONNX file to write (weights over 2 GB go beside it, in OUT.data)")
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
    add_settings(p, ModelSettings, fields=("checkpoint", "sigma"), positional=("checkpoint",))
    add_settings(p, ExportSettings)
    add_reference_flags(p)
    add_load_flags(p)
    return p


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    args = export_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    model = settings_from_args(ModelSettings, args).checkpoint_only("export")
    options = settings_from_args(ExportSettings, args)
    t0 = time.perf_counter()
    overrides = {} if options.pretrained is None else {"pretrained": options.pretrained}
    reference, few_shot = reference_of(args)
    meta = export_onnx(model.checkpoint, options.out, sigma=model.sigma, half=options.half,
                       image_size=options.image_size, threshold=options.threshold,
                       trust=trusted(args), reference=reference.reference, few_shot=few_shot,
                       save_reference=reference.save_reference, **overrides)
    size = sum(p.stat().st_size for p in exported_files(options.out))
    thr = "none" if meta.threshold is None else f"{meta.threshold:.4g} ({meta.threshold_source})"
    print(f"export: {options.out} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s): images uint8 "
          f"[B, {meta.image_size}, {meta.image_size}, 3] -> pred_score [B], anomaly_map [B, {meta.image_size}, "
          f"{meta.image_size}]; σ {meta.sigma:g}, threshold {thr}"
          + (f"; few-shot bank of {meta.reference['images']} images inside" if meta.reference else ""))
    return 0

