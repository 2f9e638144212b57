"""``glocalclip export``: the command line of ``deploy/export.py`` (one ONNX graph from image to
score and map). The checkpoint and σ are the shared :class:`ModelSettings`' fields."""
from __future__ import annotations

import sys
import time
from typing import Optional, Sequence

from ..deploy.export import export_onnx, exported_files
from ..inference.settings import ModelSettings
from .flags import reference_of, settings_from_args, trusted
from .parsers import ExportSettings, export_parser


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    args = export_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    model = settings_from_args(ModelSettings, args).checkpoint_only("export")
    options = settings_from_args(ExportSettings, args)
    t0 = time.perf_counter()
    overrides = {} if options.pretrained is None else {"pretrained": options.pretrained}
    reference, few_shot = reference_of(args)
    meta = export_onnx(model.checkpoint, options.out, sigma=model.sigma, half=options.half, int8=options.int8,
                       image_size=options.image_size, threshold=options.threshold,
                       trust=trusted(args), reference=reference.reference, few_shot=few_shot,
                       save_reference=reference.save_reference, overwrite_reference=reference.overwrite_reference,
                       **overrides)
    size = sum(p.stat().st_size for p in exported_files(options.out))
    thr = "none" if meta.threshold is None else f"{meta.threshold:.4g} ({meta.threshold_source})"
    print(f"export: {options.out} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s): images uint8 "
          f"[B, {meta.image_size}, {meta.image_size}, 3] -> pred_score [B], anomaly_map [B, {meta.image_size}, "
          f"{meta.image_size}]; σ {meta.sigma:g}, threshold {thr}"
          + (f"; few-shot bank of {meta.reference['images']} images inside" if meta.reference else ""))
    return 0

