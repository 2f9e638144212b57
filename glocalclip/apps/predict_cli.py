"""``glocalclip predict``: score images with a checkpoint (PyTorch) or an exported ONNX file (ONNX
Runtime, no torch loaded), and write the same files either way.

Writes ``predictions.csv`` and ``predictions.jsonl`` with anomalib's field names (``image_path,
pred_score, pred_label, anomaly_map``; ``anomaly_map`` is the path of the saved raw map ``.npy``),
plus ``map_max`` and ``overlay`` (the heat-map PNG).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ..datasets.errors import DatasetError
from ..settings import check_settings, setting
from .flags import add_model_flags, add_settings, model_overrides, new_parser, settings_from_args
from .predict_io import LoadedImage, expand_inputs, output_names, read_image, save_outputs, write_predictions

DEFAULT_SIGMA = 8.0  # the paper's protocol


@dataclass
class PredictConfig:
    """The settings of ``glocalclip predict`` other than the model's (those come from the checkpoint,
    or are built into an ONNX file)."""

    inputs: list[str] = setting(default_factory=list, positional=True, nargs="+", metavar="INPUT",
                                help="image files, folders (searched recursively) or glob patterns "
                                     "(quote them: 'data/**/*.png')")
    checkpoint: Optional[str] = setting(None, aliases=("checkpoint_path",),
                                        help="our checkpoint, or an original GlocalCLIP/AnomalyCLIP one (then give "
                                             "its model flags); or give --model")
    model: Optional[str] = setting(None, help="an ONNX file from `glocalclip export`, run with ONNX Runtime (torch "
                                              "is not loaded); its σ and threshold are stored in the file")
    out: str = setting("./predictions", help="output folder")
    threshold: Optional[float] = setting(None, parse=float, metavar="T", help="label = score >= T",
                                         default_text="the threshold test.py stored beside the checkpoint")
    batch_size: int = setting(8, minimum=1, help="images per forward pass")
    sigma: Optional[float] = setting(None, parse=float, help="Gaussian smoothing of the maps",
                                     default_text=f"{DEFAULT_SIGMA:g}, the paper's; an ONNX file has its σ built "
                                                  f"in and refuses another")
    device: Optional[str] = setting(None, help="cuda, cuda:1, cpu",
                                    default_text="the GPU if present; --model: ONNX Runtime's CPU unless cuda is asked for")
    map_range: Optional[Tuple[float, float]] = setting(
        None, parse=float, nargs=2, metavar=("LO", "HI"), help="colour scale of the overlays",
        default_text="0 .. number of feature layers, the map's full range, so that images compare")
    per_image_range: bool = setting(False, switch=True,
                                    help="colour each overlay by its own map's min..max (shows where, even when faint)")
    overlays: bool = setting(True, flag="no_overlays", switch=False, help="do not write overlay PNGs")
    progress: bool = setting(True, flag="no_progress", switch=False, help="no progress bar")

    def __post_init__(self) -> None:
        check_settings(self)
        if (self.checkpoint is None) == (self.model is None):
            raise ValueError("give the model to score with: --checkpoint CKPT (PyTorch) or --model FILE.onnx "
                             "(ONNX Runtime), one of the two")


def predict_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip predict", "Score images with a trained checkpoint or an exported ONNX file: "
                                         "anomaly score, label, heat map.")
    add_settings(p, PredictConfig)
    add_model_flags(p, for_training=False)
    return p


def build_predictor(cfg: PredictConfig, overrides: dict[str, Any]):
    """The PyTorch Predictor for ``--checkpoint``, the ONNX Runtime one for ``--model``."""
    if cfg.model is None:
        from .predict import Predictor

        sigma = DEFAULT_SIGMA if cfg.sigma is None else cfg.sigma
        return Predictor.from_checkpoint(cfg.checkpoint, device=cfg.device, threshold=cfg.threshold,
                                         sigma=sigma, batch_size=cfg.batch_size, **overrides)
    if overrides:
        raise ValueError(f"model settings ({', '.join(sorted(overrides))}) set up a checkpoint's model; an ONNX "
                         f"file fixes its model: export it again with the settings you want")
    from ..deploy.runtime import OnnxPredictor

    predictor = OnnxPredictor(cfg.model, threshold=cfg.threshold, batch_size=cfg.batch_size, device=cfg.device)
    if cfg.sigma is not None and cfg.sigma != predictor.sigma:
        raise ValueError(f"{cfg.model} smooths its maps with σ={predictor.sigma:g}, built into the file; "
                         f"export it again with `glocalclip export ... --sigma {cfg.sigma:g}` for another σ")
    return predictor


def score_files(predictor, files: Sequence[Path], out: Path, value_range: Optional[tuple[float, float]],
                overlays: bool, progress: bool) -> tuple[list[dict[str, Any]], int]:
    """Score ``files`` in batches, writing each map (and overlay) as its batch finishes. Unreadable
    files are reported and skipped. Returns (records in input order, number skipped)."""
    from tqdm import tqdm

    names = dict(zip(map(str, files), output_names(files)))
    records: list[dict[str, Any]] = []
    skipped = 0
    batch: list[LoadedImage] = []

    def flush() -> None:
        preds = predictor.predict_uint8(np.stack([b.pixels for b in batch]), [b.size for b in batch],
                                        [b.path for b in batch])
        records.extend(save_outputs(p, names[b.path], out, b.rgb, value_range) for b, p in zip(batch, preds))
        batch.clear()

    bar = tqdm(files, desc="predict", unit="img", disable=not progress)
    for f in bar:
        try:
            batch.append(read_image(f, predictor.image_size, want_rgb=overlays))
        except (DatasetError, OSError, ValueError) as e:  # unreadable: report, skip, go on
            skipped += 1
            bar.write(f"skipped {f}: {e}", file=sys.stderr)
            continue
        if len(batch) == predictor.batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    return records, skipped


def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    args = predict_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = settings_from_args(PredictConfig, args)
    files, missing = expand_inputs(cfg.inputs)
    for inp, why in missing:
        print(f"skipped {inp}: {why}", file=sys.stderr)
    if not files:
        print("predict: no images to score", file=sys.stderr)
        return 2
    predictor = build_predictor(cfg, model_overrides(args))
    out = Path(cfg.out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    if cfg.overlays:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    if cfg.map_range:
        value_range: Optional[tuple[float, float]] = (cfg.map_range[0], cfg.map_range[1])
    else:
        value_range = None if cfg.per_image_range else predictor.map_value_range
    records, skipped = score_files(predictor, files, out, value_range, overlays=cfg.overlays,
                                   progress=cfg.progress)
    write_predictions(records, out)
    print(_summary(records, predictor.threshold, skipped + len(missing), out / "predictions.csv"))
    return 0 if records else 1


def _summary(records: list[dict[str, Any]], threshold: Optional[float], skipped: int, csv_path: Path) -> str:
    n_anom = sum(1 for r in records if r["pred_label"] == 1)
    anomalous = f"{n_anom} anomalous (threshold {threshold:.4g})" if threshold is not None else \
        "anomalous: n/a (no threshold: pass --threshold or run test.py on the checkpoint)"
    return f"predict: {len(records)} scored, {anomalous}, {skipped} skipped -> {csv_path}"
