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
import contextlib
import dataclasses
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from ..datasets.errors import DatasetError
from ..datasets.scan import expand_image_inputs
from ..engine.settings import progress_setting
from ..inference.images import FIELDS, LoadedImage, output_names, read_image, save_outputs
from ..inference.interface import ImagePredictor
from ..inference.settings import ModelSettings
from ..inference.visualize import prediction_caption, threshold_caption
from ..files import removed_if_left_empty
from ..locks import FolderLock
from ..settings import check_settings, setting
from .backends import open_predictor
from .flags import (add_load_flags, add_model_flags, add_reference_flags, add_settings, model_overrides, new_parser,
                    reference_of, settings_from_args, trusted)
from .predict_runs import PredictionsFile, image_key
from .processes import Processes, processes_of_this_run


@dataclass
class PredictConfig:
    """The settings of ``glocalclip predict`` other than which model and how to run it
    (:class:`ModelSettings`)."""

    inputs: list[str] = setting(default_factory=list, positional=True, nargs="+", metavar="INPUT",
                                help="image files, folders (searched recursively) or glob patterns "
                                     "(quote them: 'data/**/*.png')")
    out: str = setting("./predictions", help="output folder")
    threshold: Optional[float] = setting(None, parse=float, metavar="T", help="label = score >= T",
                                         default_text="the threshold test.py stored beside the checkpoint")
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


def predict_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip predict", "Score images with a trained checkpoint or an exported ONNX file: "
                                         "anomaly score, label, heat map.")
    add_settings(p, PredictConfig)
    add_settings(p, ModelSettings, fields=("checkpoint", "model", "sigma", "device", "batch_size"))
    add_reference_flags(p)
    add_load_flags(p)
    add_model_flags(p, for_training=False)
    return p


class ScoredSoFar:
    """What a run has scored: its records, and the inputs it skipped."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.skipped = 0


def score_batches(predictor: ImagePredictor, batches: list[list[Path]], out: Path, names: dict[str, str],
                  sink: Optional[PredictionsFile], value_range: Optional[tuple[float, float]], cfg: PredictConfig,
                  so_far: ScoredSoFar, processes: Processes) -> None:
    """Score ``batches`` of files, each process its share, round by round. Each batch's maps and
    overlays are written by the process that scored it, then the round's rows are appended to
    ``sink`` by the main process, in batch order (flushed): whatever stops the run, every row
    there has its map. Unreadable files are reported and skipped."""
    bar = progress_bar(sum(map(len, batches)), cfg.progress and processes.is_main)
    for step in range(processes.steps(len(batches))):
        rows = _score_batch(predictor, processes.batch_of(batches, step) or [], out, names, value_range, cfg,
                            so_far, bar)
        every = processes.gather(rows)
        if sink is not None:
            sink.append([r for part in every for r in part])
        so_far.records += [r for part in every for r in part] if processes.is_main else rows
        bar.update(sum(map(len, every)) if processes.is_main else 0)
    bar.close()


class _NoBar:
    """What ``predict`` uses of a tqdm bar, where tqdm is not installed (the torch-free runtime install):
    messages to stderr, and nothing else."""

    def write(self, message: str, file=None) -> None:
        print(message, file=file or sys.stderr)

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, show: bool):
    """tqdm's bar counting ``total`` images; without tqdm installed, none (the messages still print)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="predict", unit="img", disable=not show)


def _score_batch(predictor: ImagePredictor, files: list[Path], out: Path, names: dict[str, str],
                 value_range: Optional[tuple[float, float]], cfg: PredictConfig, so_far: ScoredSoFar, bar
                 ) -> list[dict[str, Any]]:
    """One batch: read (skipping what cannot be read), score, write maps and overlays; its rows."""
    batch: list[LoadedImage] = []
    for f in files:
        try:
            batch.append(read_image(f, predictor.image_size, want_rgb=cfg.overlays))
        except (DatasetError, OSError, ValueError) as e:  # unreadable: report, skip, go on
            so_far.skipped += 1
            bar.write(f"skipped {f}: {e}", file=sys.stderr)
    if not batch:
        return []
    preds = predictor.predict_uint8(np.stack([b.pixels for b in batch]), [b.size for b in batch],
                                    [b.path for b in batch])
    return [save_outputs(p, names[b.path], out, b.rgb, value_range,
                         prediction_caption(p.pred_score, p.pred_label, predictor.threshold,
                                            predictor.threshold_source, predictor.sigma))
            for b, p in zip(batch, preds)]


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
    model = settings_from_args(ModelSettings, args).one_source("score with")
    reference, few_shot = reference_of(args)  # a few-shot flag without --reference is refused before any work
    files, missing = expand_image_inputs(cfg.inputs)  # the expansion --reference uses too
    for inp, why in missing:
        print(f"skipped {inp}: {why}", file=sys.stderr)
    if not files:
        print("predict: no images to score", file=sys.stderr)
        return 2
    processes = processes_of_this_run()
    try:
        return _predict(cfg, model, model_overrides(args), trusted(args), files, len(missing), processes,
                        reference, few_shot)
    finally:
        processes.close()


def _predict(cfg: PredictConfig, model: ModelSettings, overrides: dict[str, Any], trust: bool, files: list[Path],
             n_missing: int, processes: Processes, reference: Any = None, few_shot: Any = None) -> int:
    """The run: the main process holds the lock and the CSV; every process scores its batches (each
    builds the same few-shot bank; the main process alone saves it)."""
    out = Path(cfg.out)
    so_far = ScoredSoFar()
    # a second predict into this --out refuses, naming this one; a failed start leaves no empty --out
    folder = removed_if_left_empty(out) if processes.is_main else contextlib.nullcontext()
    with folder, FolderLock(out, "predict") if processes.is_main else contextlib.nullcontext() as lock:
        sink, todo, refusal = None, None, None
        if processes.is_main:  # a second predict into this --out refuses, naming this one
            if lock.taken_over:
                print(f"note: took over the lock of {out} left by pid {lock.taken_over.get('pid')}, which is gone",
                      file=sys.stderr)
            try:
                sink = PredictionsFile(out, FIELDS).check(cfg.resume, cfg.overwrite)  # before the model is built
                todo = [str(f) for f in _still_to_score(files, sink)]
            except ValueError as e:
                refusal = str(e)
        refusal, todo = processes.broadcast((refusal, todo))
        if refusal is not None:
            raise ValueError(refusal)
        batch_size = model.batch_size or 8
        model = dataclasses.replace(model, device=processes.device(model.device), batch_size=batch_size)
        if reference is not None and not processes.is_main:
            reference = dataclasses.replace(reference, save_reference=None, overwrite_reference=False)
        predictor = open_predictor(model, "score with", threshold=cfg.threshold, overrides=overrides, trust=trust,
                                   reference=reference, few_shot=few_shot)
        if sink is not None:
            sink.start()
        processes.broadcast(None)  # no process writes a map before the main one has cleared the folder
        names = dict(zip(map(str, files), output_names(files)))  # all inputs: a resumed run keeps the names
        todo_files = [Path(f) for f in todo]
        batches = [todo_files[i:i + batch_size] for i in range(0, len(todo_files), batch_size)]
        try:
            score_batches(predictor, batches, out, names, sink, _value_range(cfg, predictor), cfg, so_far, processes)
        except KeyboardInterrupt:
            if sink is not None:
                print(f"predict: interrupted; the {len(sink.kept) + len(so_far.records)} rows scored so far are in "
                      f"{sink.paths()['csv']}; continue with --resume", file=sys.stderr)
            raise
    skipped = sum(processes.gather(so_far.skipped))
    if not processes.is_main:
        return 0
    print(_summary(so_far.records, predictor.threshold, skipped + n_missing, out / "predictions.csv"))
    if predictor.threshold is not None:
        print(f"labels: {threshold_caption(predictor.threshold, predictor.threshold_source)}; maps smoothed with "
              f"σ {predictor.sigma:g}; {predictor.weights} weights ({predictor.backend})")
    return 0 if so_far.records or sink.kept else 1


def _summary(records: list[dict[str, Any]], threshold: Optional[float], skipped: int, csv_path: Path) -> str:
    n_anom = sum(1 for r in records if r["pred_label"] == 1)
    anomalous = f"{n_anom} anomalous (threshold {threshold:.4g})" if threshold is not None else \
        "anomalous: n/a (no threshold: pass --threshold or run test.py on the checkpoint)"
    return f"predict: {len(records)} scored, {anomalous}, {skipped} skipped -> {csv_path}"
