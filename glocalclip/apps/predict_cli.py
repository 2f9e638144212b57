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
from typing import Any, Optional, Sequence

import numpy as np

from ..datasets.errors import DatasetError
from .cli import add_model_args, model_overrides, positive_int
from .predict_io import LoadedImage, expand_inputs, output_names, read_image, save_outputs, write_predictions

DEFAULT_SIGMA = 8.0  # the paper's protocol


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glocalclip predict", description="Score images with a trained "
                                "checkpoint or an exported ONNX file: anomaly score, label, heat map.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) "
                   "or glob patterns (quote them: 'data/**/*.png')")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", "--checkpoint_path", dest="checkpoint",
                        help="our checkpoint, or an original GlocalCLIP/AnomalyCLIP one (then give its model flags)")
    source.add_argument("--model", help="an ONNX file from `glocalclip export`, run with ONNX Runtime (torch is "
                        "not loaded); its σ and threshold are stored in the file")
    p.add_argument("--out", default="./predictions", help="output folder (default ./predictions)")
    p.add_argument("--threshold", type=float, default=None,
                   help="label = score >= T (default: the threshold test.py stored in the checkpoint)")
    p.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass")
    p.add_argument("--sigma", type=float, default=None, help=f"Gaussian smoothing of the maps (default "
                   f"{DEFAULT_SIGMA:g}, the paper's; an ONNX file has its σ built in and refuses another)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: GPU if present; --model: ONNX "
                   "Runtime's CPU unless cuda is asked for)")
    p.add_argument("--map_range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="colour scale of the overlays (default: 0 .. number of feature layers, the map's "
                        "full range, so that images compare)")
    p.add_argument("--per_image_range", action="store_true",
                   help="colour each overlay by its own map's min..max (shows where, even when faint)")
    p.add_argument("--no_overlays", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_model_args(p, defaults=False)
    return p


def build_predictor(args: argparse.Namespace, argv: Sequence[str]):
    """The PyTorch Predictor for ``--checkpoint``, the ONNX Runtime one for ``--model``."""
    overrides = model_overrides(args, argv)
    if args.model is None:
        from .predict import Predictor

        sigma = DEFAULT_SIGMA if args.sigma is None else args.sigma
        return Predictor.from_checkpoint(args.checkpoint, device=args.device, threshold=args.threshold,
                                         sigma=sigma, batch_size=args.batch_size, **overrides)
    if overrides:
        raise ValueError(f"model settings ({', '.join(sorted(overrides))}) set up a checkpoint's model; an ONNX "
                         f"file fixes its model: export it again with the settings you want")
    from ..deploy.runtime import OnnxPredictor

    predictor = OnnxPredictor(args.model, threshold=args.threshold, batch_size=args.batch_size,
                              device=args.device)
    if args.sigma is not None and args.sigma != predictor.sigma:
        raise ValueError(f"{args.model} smooths its maps with σ={predictor.sigma:g}, built into the file; "
                         f"export it again with `glocalclip export ... --sigma {args.sigma:g}` for another σ")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = predict_parser().parse_args(argv)
    files, missing = expand_inputs(args.inputs)
    for inp, why in missing:
        print(f"skipped {inp}: {why}", file=sys.stderr)
    if not files:
        print("predict: no images to score", file=sys.stderr)
        return 2
    predictor = build_predictor(args, argv)
    out = Path(args.out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    if not args.no_overlays:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    if args.map_range:
        value_range: Optional[tuple[float, float]] = (args.map_range[0], args.map_range[1])
    else:
        value_range = None if args.per_image_range else predictor.map_value_range
    records, skipped = score_files(predictor, files, out, value_range, overlays=not args.no_overlays,
                                   progress=not args.no_progress)
    write_predictions(records, out)
    thr = predictor.threshold
    n_anom = sum(1 for r in records if r["pred_label"] == 1)
    anomalous = f"{n_anom} anomalous (threshold {thr:.4g})" if thr is not None else \
        "anomalous: n/a (no threshold: pass --threshold or run test.py on the checkpoint)"
    print(f"predict: {len(records)} scored, {anomalous}, {skipped + len(missing)} skipped -> "
          f"{out / 'predictions.csv'}")
    return 0 if records else 1
