"""What both predictors share, with no torch: reading inputs, the :class:`Prediction` record, the
label rule, output names, and the map and overlay files.

The PyTorch :class:`~glocalclip.inference.predictor.Predictor` and the ONNX Runtime
:class:`~glocalclip.deploy.runtime.OnnxPredictor` read images here, so both models see the same pixels
(PIL bicubic resize, ``datasets/pixels.py``), and ``glocalclip predict`` and ``serve`` write one set
of files whichever model scores them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..datasets.errors import DatasetError
from ..datasets.pixels import decoded, exif_upright, image_from_array, open_image, resized_rgb, rgb_pixels
from ..files import write_npy, write_png
from .heatmap import captioned, heat_overlay, inset_colour_bar

INPUT_FIX = "or leave it out of the inputs"  # ends the message about an input that cannot be read
FIELDS = ("image_path", "pred_score", "pred_label", "anomaly_map", "map_max", "overlay")

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


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


@dataclass
class LoadedImage:
    """An input as the model sees it, plus what the outputs need from it."""

    pixels: np.ndarray  # [S, S, 3] uint8, resized
    size: tuple[int, int]  # (height, width) of the input
    path: Optional[str]
    rgb: Optional[np.ndarray] = None  # [h, w, 3] uint8 at the input's size, for the overlay, when asked


def read_image(item: ImageInput, image_size: int, want_rgb: bool = False) -> LoadedImage:
    """A path, PIL image or array [H, W(, C)] -> :class:`LoadedImage`. Raises DatasetError."""
    if isinstance(item, np.ndarray):
        if item.ndim not in (2, 3):
            raise DatasetError(f"an image array must be [H, W] or [H, W, C], got shape {item.shape}")
        return LoadedImage(resized_rgb(image_from_array(item), image_size), (int(item.shape[0]), int(item.shape[1])),
                           None)
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        with open_image(path, fix=INPUT_FIX) as im:
            im = exif_upright(decoded(im, "image", INPUT_FIX))  # the map lines up with the photo as shown
            w, h = im.size
            rgb = rgb_pixels(im) if want_rgb else None
            return LoadedImage(resized_rgb(im, image_size), (h, w), path, rgb)
    if isinstance(item, Image.Image):
        im = exif_upright(decoded(item, "image", INPUT_FIX))
        w, h = im.size
        rgb = rgb_pixels(im) if want_rgb else None
        return LoadedImage(resized_rgb(im, image_size), (h, w), getattr(im, "filename", None) or None, rgb)
    raise TypeError(f"cannot predict on a {type(item).__name__}: pass a path, a PIL image or a numpy array")


def as_items(images: Union[ImageInput, Iterable[ImageInput]]) -> tuple[list[ImageInput], bool]:
    """(the inputs as a list, whether one image was given): a path, PIL image or [H, W(, C)] array is
    one image; a [B, H, W, C] array or any other iterable is several."""
    if isinstance(images, np.ndarray):
        return (list(images), False) if images.ndim == 4 else ([images], True)
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images], True
    return list(images), False


def predict_images(predictor, images: Union[ImageInput, Iterable[ImageInput]], **options: Any
                   ) -> Union[Prediction, list[Prediction]]:
    """``predictor.predict``: read the images, score them ``predictor.batch_size`` at a time with
    ``predictor.predict_uint8(pixels, sizes, paths, **options)``; one image in, one Prediction out."""
    items, single = as_items(images)
    out: list[Prediction] = []
    for start in range(0, len(items), predictor.batch_size):
        loaded = [read_image(it, predictor.image_size) for it in items[start:start + predictor.batch_size]]
        out += predictor.predict_uint8(np.stack([b.pixels for b in loaded]), [b.size for b in loaded],
                                       [b.path for b in loaded], **options)
    return out[0] if single else out


def label_of(score: float, threshold: Optional[float]) -> Optional[int]:
    """1 (anomalous) when ``score >= threshold``, 0 below, None without a threshold."""
    return None if threshold is None else int(score >= threshold)


#: a score from a batch of several images this close to the threshold is re-scored alone before it is
#: labelled. A batch moves an image's score (the kernels differ with the batch's shape) by ~1e-7 in float32
#: on the CPU (measured); TF32 or half precision on a GPU move it more: the guard leaves room up to 1e-3
LABEL_GUARD = 1e-3


def batch_invariant_scores(scores: Sequence[float], threshold: Optional[float],
                           score_alone: Callable[[int], float]) -> list[float]:
    """The label rule of both predictors, the ONNX runtime and serve, in one place: an image's label
    is ``label_of`` its score *scored alone*, so the same image gets the same label whatever else is in
    its batch. Scores further than LABEL_GUARD from the threshold cannot cross it in another batch
    and are kept; a nearer one (in a batch of several) is replaced by ``score_alone(i)``, the image
    scored in a batch of its own, so that the score reported and its label agree (docs/usage.md)."""
    if threshold is None or len(scores) < 2:
        return list(scores)
    return [score_alone(i) if abs(s - threshold) < LABEL_GUARD else s for i, s in enumerate(scores)]


# ---------------------------------------------------------------------------- outputs
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


# ---------------------------------------------------------------------------- outputs
def overlay_rgb(rgb: np.ndarray, pred: Prediction, value_range: Optional[tuple[float, float]],
                caption: Sequence[str] = (), colour_bar: bool = False) -> np.ndarray:
    """The heat map over the image (uint8 RGB [h, w, 3]), with the ``caption`` lines written on it
    (``visualize.prediction_caption``: the predicted label and the threshold it came from; the web
    page shows them beside the picture instead) and, with ``colour_bar``, the colours' key along its
    bottom edge (``value_range``, else the map's own min..max); the picture keeps the image's size.
    Numpy and Pillow only: the torch-free install has no OpenCV."""
    vis = heat_overlay(rgb, pred.anomaly_map, value_range)
    if caption:
        vis = captioned(vis, list(caption))
    if colour_bar:
        amap = pred.anomaly_map
        key = value_range if value_range is not None else (float(amap.min()), float(amap.max()))
        vis = inset_colour_bar(vis, key, "anomaly map" if value_range is not None else "this image's map")
    return vis


def save_outputs(pred: Prediction, name: str, out: Path, rgb: Optional[np.ndarray],
                 value_range: Optional[tuple[float, float]], caption: Sequence[str] = ()) -> dict[str, Any]:
    """``maps/<name>.npy`` (the raw map) and, given the image's pixels, ``overlays/<name>.png`` with
    ``caption`` on it and a colour bar along its bottom edge, each written atomically (a full disk leaves no half
    file); returns the prediction's record with both paths."""
    npy = write_npy(out / "maps" / f"{name}.npy", pred.anomaly_map.astype(np.float32))
    png = None
    if rgb is not None:
        png = write_png(out / "overlays" / f"{name}.png", overlay_rgb(rgb, pred, value_range, caption, colour_bar=True))
    return pred.record(anomaly_map=str(npy), overlay=str(png) if png else None)

