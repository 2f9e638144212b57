"""``glocalclip predict``: score images with a checkpoint (PyTorch) or an exported ONNX file (ONNX
Runtime, no torch loaded), and write the same files either way.

Writes ``predictions.csv`` and ``predictions.jsonl`` with anomalib's field names (``image_path,
pred_score, pred_label, anomaly_map``; ``anomaly_map`` is the path of the saved raw map ``.npy``),
plus ``map_max`` and ``overlay`` (the heat-map PNG). Rows are appended batch by batch, one run at a
time per ``--out``; a rerun continues (``--resume``) or replaces (``--overwrite``) the earlier one
(``predict_runs.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ..datasets.errors import DatasetError
from ..engine.settings import PAPER_SIGMA as DEFAULT_SIGMA, progress_setting
from ..settings import check_settings, setting
from .flags import add_load_flags, add_model_flags, add_settings, model_overrides, new_parser, settings_from_args, trusted
from ..files import removed_if_left_empty
from ..locks import FolderLock
from .predict_io import check_model_source, FIELDS, LoadedImage, expand_inputs, output_names, read_image, save_outputs
from .predict_runs import PredictionsFile, image_key



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
    progress: bool = progress_setting()
    resume: bool = setting(False, switch=True,
                           help="continue the predictions in --out: the images already in its predictions.csv are "
                                "skipped, the rest scored and appended")
    overwrite: bool = setting(False, switch=True,
                              help="replace the predictions in --out: its CSV, JSONL, maps and overlays are removed "
                                   "first")

    def __post_init__(self) -> None:
        check_settings(self)
        check_model_source(self.checkpoint, self.model, "score with")


def predict_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip predict", "Score images with a trained checkpoint or an exported ONNX file: "
                                         "anomaly score, label, heat map.")
    add_settings(p, PredictConfig)
    add_load_flags(p)
    add_model_flags(p, for_training=False)
    return p


def build_predictor(cfg: PredictConfig, overrides: dict[str, Any], trust: bool = False):
    """The PyTorch Predictor for ``--checkpoint`` (``trust``: ``--trust_checkpoint``), the ONNX Runtime
    one for ``--model``."""
    if cfg.model is None:
        from .predict import Predictor

        sigma = DEFAULT_SIGMA if cfg.sigma is None else cfg.sigma
        return Predictor.from_checkpoint(cfg.checkpoint, device=cfg.device, threshold=cfg.threshold,
                                         sigma=sigma, batch_size=cfg.batch_size, trust=trust, **overrides)
    if overrides:
        raise ValueError(f"model settings ({', '.join(sorted(overrides))}) set up a checkpoint's model; an ONNX "
                         f"file fixes its model: export it again with the settings you want")
    from ..deploy.runtime import OnnxPredictor

    predictor = OnnxPredictor(cfg.model, threshold=cfg.threshold, batch_size=cfg.batch_size, device=cfg.device)
    if cfg.sigma is not None and cfg.sigma != predictor.sigma:
        raise ValueError(f"{cfg.model} smooths its maps with σ={predictor.sigma:g}, built into the file; "
                         f"export it again with `glocalclip export ... --sigma {cfg.sigma:g}` for another σ")
    return predictor


class ScoredSoFar:
    """What a run has scored: its records, and the inputs it skipped."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.skipped = 0


def score_files(predictor, files: Sequence[Path], out: Path, names: dict[str, str], sink: PredictionsFile,
                value_range: Optional[tuple[float, float]], cfg: PredictConfig, so_far: ScoredSoFar) -> None:
    """Score ``files`` in batches. Each batch's maps and overlays are written, then its rows appended
    to ``sink`` (flushed): whatever stops the run, every row there has its map. Unreadable files are
    reported and skipped."""
    from .visualize import prediction_caption

    source = predictor.threshold_source
    batch: list[LoadedImage] = []

    def flush() -> None:
        preds = predictor.predict_uint8(np.stack([b.pixels for b in batch]), [b.size for b in batch],
                                        [b.path for b in batch])
        rows = [save_outputs(p, names[b.path], out, b.rgb, value_range,
                             prediction_caption(p.pred_score, p.pred_label, predictor.threshold, source))
                for b, p in zip(batch, preds)]
        sink.append(rows)
        so_far.records += rows
        batch.clear()

    bar = progress_bar(files, cfg.progress)
    for f in bar:
        try:
            batch.append(read_image(f, predictor.image_size, want_rgb=cfg.overlays))
        except (DatasetError, OSError, ValueError) as e:  # unreadable: report, skip, go on
            so_far.skipped += 1
            bar.write(f"skipped {f}: {e}", file=sys.stderr)
            continue
        if len(batch) == predictor.batch_size:
            flush()
    if batch:
        flush()
    bar.close()


class _NoBar:
    """What ``predict`` uses of a tqdm bar, where tqdm is not installed (the torch-free runtime install):
    the items, messages to stderr, and a count at the end."""

    def __init__(self, items: Sequence[Path]):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def write(self, message: str, file=None) -> None:
        print(message, file=file or sys.stderr)

    def close(self) -> None:
        pass


def progress_bar(files: Sequence[Path], show: bool):
    """tqdm's bar over ``files``; without tqdm installed, none (the messages still print)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar(files)
    return tqdm(files, desc="predict", unit="img", disable=not show)


def _value_range(cfg: PredictConfig, predictor) -> Optional[tuple[float, float]]:
    if cfg.map_range:
        return (cfg.map_range[0], cfg.map_range[1])
    return None if cfg.per_image_range else predictor.map_value_range


def _still_to_score(files: list[Path], sink: PredictionsFile) -> list[Path]:
    """The inputs not in the CSV that ``--resume`` continues (all of them otherwise)."""
    done = sink.done()
    todo = [f for f in files if image_key(f) not in done]
    if sink.kept:
        print(f"--resume: {len(sink.kept)} rows kept in {sink.paths()['csv']}; {len(files) - len(todo)} of the "
              f"inputs were scored already and are skipped", file=sys.stderr)
    return todo


def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    args = predict_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = settings_from_args(PredictConfig, args)
    files, missing = expand_inputs(cfg.inputs)
    for inp, why in missing:
        print(f"skipped {inp}: {why}", file=sys.stderr)
    if not files:
        print("predict: no images to score", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    so_far = ScoredSoFar()
    # a second predict into this --out refuses, naming this one; a failed start leaves no empty --out
    with removed_if_left_empty(out), FolderLock(out, "predict") as lock:
        if lock.taken_over:
            print(f"note: took over the lock of {out} left by pid {lock.taken_over.get('pid')}, which is gone",
                  file=sys.stderr)
        sink = PredictionsFile(out, FIELDS).check(cfg.resume, cfg.overwrite)  # before the model is built
        todo = _still_to_score(files, sink)
        predictor = build_predictor(cfg, model_overrides(args), trusted(args))
        sink.start()
        names = dict(zip(map(str, files), output_names(files)))  # all inputs: a resumed run keeps the names
        try:
            score_files(predictor, todo, out, names, sink, _value_range(cfg, predictor), cfg, so_far)
        except KeyboardInterrupt:
            print(f"predict: interrupted; the {len(sink.kept) + len(so_far.records)} rows scored so far are in "
                  f"{sink.paths()['csv']}; continue with --resume", file=sys.stderr)
            raise
    print(_summary(so_far.records, predictor.threshold, so_far.skipped + len(missing), out / "predictions.csv"))
    if predictor.threshold is not None:
        from .visualize import threshold_caption

        print(f"labels: {threshold_caption(predictor.threshold, predictor.threshold_source)}")
    return 0 if so_far.records or sink.kept else 1


def _summary(records: list[dict[str, Any]], threshold: Optional[float], skipped: int, csv_path: Path) -> str:
    n_anom = sum(1 for r in records if r["pred_label"] == 1)
    anomalous = f"{n_anom} anomalous (threshold {threshold:.4g})" if threshold is not None else \
        "anomalous: n/a (no threshold: pass --threshold or run test.py on the checkpoint)"
    return f"predict: {len(records)} scored, {anomalous}, {skipped} skipped -> {csv_path}"
