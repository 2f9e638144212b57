"""Score your own images: ``glocalclip predict`` and the :class:`Predictor` API.

For every image: the anomaly score (the model's image score, docs/design.md §4), a predicted label
(score >= threshold, where the threshold is given explicitly, else the F1-max threshold that
``test.py`` stored beside the checkpoint (``epoch_15.pth.threshold.json``), else one embedded in a
checkpoint of an older version, else there is no label), the maximum of the smoothed anomaly map,
and the smoothed map resized back from the model's resolution to the image's own.

    from glocalclip import Predictor
    pred = Predictor.from_checkpoint("checkpoints/epoch_15.pth", device="cuda")
    for p in pred.predict(["a.png", "b.jpg"]):
        print(p.image_path, p.pred_score, p.pred_label, p.anomaly_map.shape)

The command line writes ``predictions.csv`` and ``predictions.jsonl`` with anomalib's field names
(``image_path, pred_score, pred_label, anomaly_map``; ``anomaly_map`` is the path of the saved raw
map ``.npy``), plus ``map_max`` and ``overlay`` (the heat-map PNG).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import DatasetError, load_image
from ..datasets.preprocess import decoded, exif_upright, open_image
from ..engine.settings import device_setting, progress_setting
from ..engine.smoothing import GaussianSmoothing, smoothed_scores
from ..settings import check_settings, setting
from .flags import add_model_flags, add_settings, model_overrides, new_parser, settings_from_args

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
INPUT_FIX = "or leave it out of the inputs"  # ends the message about an input that cannot be read
FIELDS = ("image_path", "pred_score", "pred_label", "anomaly_map", "map_max", "overlay")

ImageInput = Union[str, os.PathLike, "Image.Image", np.ndarray]  # noqa: F821


@dataclass
class Prediction:
    """One scored image. ``anomaly_map`` is float32 [h, w] at the input's own resolution."""

    image_path: Optional[str]
    pred_score: float
    pred_label: Optional[int]
    map_max: float
    anomaly_map: np.ndarray

    def record(self, **extra: Any) -> dict[str, Any]:
        """The JSON-able fields (the map itself left out)."""
        return {"image_path": self.image_path, "pred_score": self.pred_score, "pred_label": self.pred_label,
                "map_max": self.map_max, **extra}


def _read(item: ImageInput, image_size: int, want_rgb: bool = False
          ) -> tuple[torch.Tensor, tuple[int, int], Optional[str], Optional[np.ndarray]]:
    """(normalised tensor [3, S, S], (height, width) of the input, path or None, and with
    ``want_rgb`` a file's pixels as uint8 RGB for the overlay). Raises DatasetError."""
    if isinstance(item, np.ndarray):
        if item.ndim not in (2, 3):
            raise DatasetError(f"an image array must be [H, W] or [H, W, C], got shape {item.shape}")
        return load_image(item, image_size), (int(item.shape[0]), int(item.shape[1])), None, None
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        with open_image(path, fix=INPUT_FIX) as im:
            im = exif_upright(decoded(im, "image", INPUT_FIX))  # the map lines up with the photo as shown
            w, h = im.size
            rgb = _to_rgb(im) if want_rgb else None
            return load_image(im, image_size), (h, w), path, rgb
    if hasattr(item, "size") and hasattr(item, "convert"):  # a PIL image
        item = exif_upright(item)
        w, h = item.size
        return load_image(item, image_size), (h, w), getattr(item, "filename", None) or None, None
    raise TypeError(f"cannot predict on a {type(item).__name__}: pass a path, a PIL image or a numpy array")


def _to_rgb(im) -> np.ndarray:
    """uint8 RGB at the image's own size (16-bit/float grey scaled as load_image does)."""
    from ..datasets.preprocess import _is_high_depth, to_8bit_grey

    if _is_high_depth(im.mode):
        im = to_8bit_grey(im)
    return np.asarray(im.convert("RGB"))


class Predictor:
    """A model with its text features computed once, scoring batches of arbitrary images."""

    def __init__(self, model, threshold: Optional[float] = None, sigma: float = 8.0, batch_size: int = 8,
                 device: Optional[Union[str, torch.device]] = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.threshold = None if threshold is None else float(threshold)
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        self._smoothing: dict[float, GaussianSmoothing] = {}  # per σ: the kernel goes to the device once
        with torch.no_grad():
            self.text = self.model.encode_text()  # once per predictor

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                        threshold: Optional[float] = None, sigma: float = 8.0, batch_size: int = 8,
                        **overrides: Any) -> "Predictor":
        """Our checkpoint (config inside), or an original GlocalCLIP/AnomalyCLIP one (settings from
        ``overrides``, prompt shapes from its tensors). ``threshold`` None: the F1-max threshold
        ``test.py`` stored beside the checkpoint, else one embedded in an older checkpoint, else no labels."""
        from ..engine.checkpoint import load_model_and_checkpoint

        model, ckpt = load_model_and_checkpoint(os.fspath(path), **overrides)
        if threshold is None:
            threshold = checkpoint_threshold(path, ckpt)
        return cls(model, threshold=threshold, sigma=sigma, batch_size=batch_size, device=device)

    @property
    def image_size(self) -> int:
        return int(self.model.cfg.image_size)

    def predict(self, images: Union[ImageInput, Iterable[ImageInput]], sigma: Optional[float] = None,
                threshold: Optional[float] = None) -> Union[Prediction, list[Prediction]]:
        """Score one image (returns a Prediction) or a sequence (returns a list), in batches.
        An unreadable image raises :class:`DatasetError`; the CLI skips such files instead."""
        single = isinstance(images, (str, os.PathLike, np.ndarray)) or hasattr(images, "convert")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images, single = list(images), False
        items = [images] if single else list(images)
        out: list[Prediction] = []
        for start in range(0, len(items), self.batch_size):
            loaded = [_read(it, self.image_size) for it in items[start:start + self.batch_size]]
            out += self.predict_tensors(torch.stack([b[0] for b in loaded]), [b[1] for b in loaded],
                                        [b[2] for b in loaded], sigma=sigma, threshold=threshold)
        return out[0] if single else out

    @torch.no_grad()
    def predict_tensors(self, x: torch.Tensor, sizes: Sequence[tuple[int, int]],
                        paths: Optional[Sequence[Optional[str]]] = None, sigma: Optional[float] = None,
                        threshold: Optional[float] = None) -> list[Prediction]:
        """Score a preprocessed batch [B, 3, S, S]; maps are resized to ``sizes`` [(h, w)] * B."""
        sigma = self.sigma if sigma is None else float(sigma)
        thr = threshold if threshold is not None else self.threshold
        smoothing = self._smoothing.get(sigma)
        if smoothing is None:
            smoothing = self._smoothing[sigma] = GaussianSmoothing(sigma, self.device)
        score, amap = smoothed_scores(self.model(x.to(self.device), text=self.text), smoothing,
                                      self.model.cfg.image_score)  # exactly as test.py
        peak = amap.flatten(1).max(1).values
        score, peak = score.float().cpu().tolist(), peak.float().cpu().tolist()
        preds = []
        for i, (h, w) in enumerate(sizes):
            m = amap[i]
            if (h, w) != tuple(m.shape):
                m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            preds.append(Prediction(image_path=paths[i] if paths else None, pred_score=score[i],
                                    pred_label=None if thr is None else int(score[i] >= thr),
                                    map_max=peak[i], anomaly_map=m.float().cpu().numpy()))
        return preds


def checkpoint_threshold(path: Union[str, os.PathLike], ckpt: dict) -> Optional[float]:
    """The threshold of the sidecar ``test.py`` wrote beside ``path`` (if it belongs to these
    contents), else the one embedded in an older checkpoint, else None."""
    from ..engine.checkpoint import read_threshold

    record = read_threshold(path)
    return record["image_score"] if record is not None else stored_threshold(ckpt)


def stored_threshold(ckpt: dict) -> Optional[float]:
    """The image-score threshold embedded in a checkpoint by ``test.py`` of older versions, if any."""
    thr = ckpt.get("threshold") if isinstance(ckpt, dict) else None
    if isinstance(thr, dict) and thr.get("image_score") is not None:
        return float(thr["image_score"])
    return None


# ---------------------------------------------------------------------------- inputs
def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given; folders searched recursively for image extensions; glob patterns expanded.
    Returns (files in order, without repeats; [(input, reason)] for inputs that matched nothing)."""
    files: list[Path] = []
    missing: list[tuple[str, str]] = []

    def from_dir(d: Path) -> list[Path]:
        return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            found = from_dir(p)
        elif p.is_file():
            found = [p]
        elif glob.has_magic(inp):
            found = []
            for m in sorted(glob.glob(inp, recursive=True)):
                mp = Path(m)
                if mp.is_dir():
                    found += from_dir(mp)
                elif mp.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(mp)
        else:
            missing.append((inp, "no such file or folder"))
            continue
        if not found:
            missing.append((inp, "no images found"))
        files += found
    seen: set[str] = set()
    unique = []
    for f in files:
        key = os.path.abspath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, missing


def output_names(files: Sequence[Path]) -> list[str]:
    """A unique relative name (no extension) per file: its path below the files' common folder."""
    if not files:
        return []
    parents = [os.path.dirname(os.path.abspath(f)) for f in files]
    root = os.path.commonpath(parents)
    names, used = [], set()
    for f in files:
        rel = os.path.relpath(os.path.abspath(f), root)
        name = os.path.splitext(rel)[0]
        if name in used:  # a.png beside a.jpg
            name = rel.replace(".", "_")
        k = 1
        base = name
        while name in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------- CLI
@dataclass
class PredictConfig:
    """The settings of ``glocalclip predict`` other than the model's (those come from the checkpoint)."""

    inputs: list[str] = setting(default_factory=list, positional=True, nargs="+", metavar="INPUT",
                                help="image files, folders (searched recursively) or glob patterns "
                                     "(quote them: 'data/**/*.png')")
    checkpoint: str = setting("", aliases=("checkpoint_path",), required=True,
                              help="our checkpoint, or an original GlocalCLIP/AnomalyCLIP one (then give its "
                                   "model flags)")
    out: str = setting("./predictions", help="output folder")
    threshold: Optional[float] = setting(None, parse=float, metavar="T",
                                         help="label = score >= T",
                                         default_text="the threshold test.py stored beside the checkpoint")
    batch_size: int = setting(8, minimum=1, help="images per batch")
    sigma: float = setting(8.0, help="Gaussian smoothing of the maps (paper: 8)")
    device: Optional[str] = device_setting()
    map_range: Optional[Tuple[float, float]] = setting(
        None, parse=float, nargs=2, metavar=("LO", "HI"), help="colour scale of the overlays",
        default_text="0 .. number of feature layers, the map's full range, so that images compare")
    per_image_range: bool = setting(False, switch=True,
                                    help="colour each overlay by its own map's min..max (shows where, even when faint)")
    overlays: bool = setting(True, flag="no_overlays", switch=False, help="do not write overlay PNGs")
    progress: bool = progress_setting()

    def __post_init__(self) -> None:
        check_settings(self)


def predict_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip predict", "Score images with a trained checkpoint: anomaly score, label, heat map.")
    add_settings(p, PredictConfig)
    add_model_flags(p, for_training=False)
    return p


def _label_text(label: Optional[int]) -> str:
    return "" if label is None else ("anomalous" if label else "normal")


def _save_batch(predictor: Predictor, batch: list[tuple[torch.Tensor, tuple[int, int], str, Optional[np.ndarray]]],
                out: Path, names: dict[str, str], value_range: Optional[tuple[float, float]]) -> list[dict[str, Any]]:
    """Score one batch of read images; save each map (.npy) and, where the pixels were kept, its
    overlay (.png). Returns the batch's records."""
    import cv2

    from .visualize import annotate, overlay

    preds = predictor.predict_tensors(torch.stack([b[0] for b in batch]), [b[1] for b in batch],
                                      [b[2] for b in batch])
    records = []
    for (_, _, path, rgb), p in zip(batch, preds):
        name = names[path]
        npy = out / "maps" / f"{name}.npy"
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, p.anomaly_map.astype(np.float32))
        png = None
        if rgb is not None:
            png = out / "overlays" / f"{name}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            vis = overlay(rgb, p.anomaly_map, value_range=value_range)
            vis = annotate(vis, f"{p.pred_score:.3f} {_label_text(p.pred_label)}".strip())
            cv2.imwrite(str(png), cv2.cvtColor(vis, cv2.COLOR_RGB2BGR))
        records.append(p.record(anomaly_map=str(npy), overlay=str(png) if png else None))
    return records


def _overlay_range(cfg: PredictConfig, predictor: Predictor) -> Optional[tuple[float, float]]:
    if cfg.map_range:
        return (cfg.map_range[0], cfg.map_range[1])
    # each layer adds (p_anomalous + 1 - p_normal) / 2 in [0, 1]
    return None if cfg.per_image_range else (0.0, float(len(predictor.model.cfg.features_list)))


def _summary(records: list[dict[str, Any]], threshold: Optional[float], skipped: int, csv_path: Path) -> str:
    n_anom = sum(1 for r in records if r["pred_label"] == 1)
    anomalous = f"{n_anom} anomalous (threshold {threshold:.4g})" if threshold is not None else \
        "anomalous: n/a (no threshold: pass --threshold or run test.py on the checkpoint)"
    return f"predict: {len(records)} scored, {anomalous}, {skipped} skipped -> {csv_path}"


def predict_main(argv: Optional[Sequence[str]] = None) -> int:
    from tqdm import tqdm

    args = predict_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = settings_from_args(PredictConfig, args)
    files, missing = expand_inputs(cfg.inputs)
    for inp, why in missing:
        print(f"skipped {inp}: {why}", file=sys.stderr)
    if not files:
        print("predict: no images to score", file=sys.stderr)
        return 2
    predictor = Predictor.from_checkpoint(cfg.checkpoint, device=cfg.device, threshold=cfg.threshold,
                                          sigma=cfg.sigma, batch_size=cfg.batch_size, **model_overrides(args))
    out = Path(cfg.out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    if cfg.overlays:
        (out / "overlays").mkdir(parents=True, exist_ok=True)
    names = dict(zip(map(str, files), output_names(files)))
    value_range = _overlay_range(cfg, predictor)
    records: list[dict[str, Any]] = []
    skipped = len(missing)
    batch: list = []
    bar = tqdm(files, desc="predict", unit="img", disable=not cfg.progress)
    for f in bar:
        try:
            x, size, _, rgb = _read(f, predictor.image_size, want_rgb=cfg.overlays)
        except (DatasetError, OSError, ValueError) as e:  # unreadable: report, skip, go on
            skipped += 1
            bar.write(f"skipped {f}: {e}", file=sys.stderr)
            continue
        batch.append((x, size, str(f), rgb))
        if len(batch) == predictor.batch_size:
            records += _save_batch(predictor, batch, out, names, value_range)
            batch = []
    if batch:
        records += _save_batch(predictor, batch, out, names, value_range)
    bar.close()
    write_predictions(records, out)
    print(_summary(records, predictor.threshold, skipped, out / "predictions.csv"))
    return 0 if records else 1


def write_predictions(records: list[dict[str, Any]], out_dir: Union[str, Path]) -> dict[str, Path]:
    """``predictions.csv`` and ``predictions.jsonl`` (anomalib's field names first)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "predictions.csv", "jsonl": out / "predictions.jsonl"}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS))
        w.writeheader()
        for r in records:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
    with open(paths["jsonl"], "w") as f:
        for r in records:
            f.write(json.dumps({k: r.get(k) for k in FIELDS}) + "\n")
    return paths
