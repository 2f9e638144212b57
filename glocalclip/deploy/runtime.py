"""The torch-free runtime: :class:`OnnxPredictor` scores images with an exported file on ONNX
Runtime, with numpy and Pillow only, and answers as the PyTorch ``Predictor`` does: both are an
``inference.interface.ImagePredictor``.

    from glocalclip.deploy import OnnxPredictor
    pred = OnnxPredictor("model.onnx")
    for p in pred.predict(["a.png", "b.jpg"]):
        print(p.image_path, p.pred_score, p.pred_label, p.anomaly_map.shape)

Images are read and resized by ``inference/images.py`` (PIL bicubic, as training and testing do), so
the file sees the PyTorch path's pixels; the graph normalises, scores and smooths; here the maps are
resized to each image's own resolution with the PyTorch path's bilinear rule.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ..inference.images import ImageInput, Prediction, batch_invariant_scores, label_of, predict_images
from .metadata import INPUT_NAME, DeployMetadata

RUNTIME_EXTRA_HINT = "the ONNX runtime needs onnxruntime: pip install 'glocalclip[deploy]' (or pip install onnxruntime)"


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output row: the two source rows and the second one's weight, as
    ``F.interpolate(mode="bilinear", align_corners=False)`` computes them (no antialias)."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    low = np.minimum(src.astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (src - low).astype(np.float32)


def resize_bilinear(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A float32 map [H, W] resized to ``size`` (h, w), bilinear, half-pixel centres, as the PyTorch
    predictor resizes its maps."""
    h, w = size
    if (h, w) == amap.shape:
        return amap.astype(np.float32, copy=True)
    r0, r1, rw = _source_index(h, amap.shape[0])
    c0, c1, cw = _source_index(w, amap.shape[1])
    rows = amap[r0] * (1 - rw)[:, None] + amap[r1] * rw[:, None]  # [h, W]
    return (rows[:, c0] * (1 - cw) + rows[:, c1] * cw).astype(np.float32)


def _providers(device: Optional[str]) -> list[str]:
    import onnxruntime as ort

    if device is None or device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(f"device {device!r}: this onnxruntime has no CUDA support (providers "
                             f"{ort.get_available_providers()}); install onnxruntime-gpu or use the CPU")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"device must be cpu or cuda[:N] for an ONNX file, got {device!r}")


class OnnxFileError(ValueError):
    """A file given as an exported model that ONNX Runtime cannot read (an input error: one message, exit 2)."""


class OnnxPredictor:
    """An exported file on ONNX Runtime. ``threshold`` None: the threshold stored in the file (from
    the checkpoint), else no labels. σ and the image size are fixed in the file (``self.metadata``)."""

    backend = "onnxruntime"

    def __init__(self, path: Union[str, os.PathLike], threshold: Optional[float] = None, batch_size: int = 8,
                 device: Optional[str] = None, threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(f"{RUNTIME_EXTRA_HINT} ({e})") from e
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX file {path} does not exist; write it with `glocalclip export CKPT --out {path}`")
        options = ort.SessionOptions()
        # int8 products (export --int8) in ONNX Runtime's exact-precision path on x86 CPUs without VNNI,
        # whose fast U8S8 kernel can overflow (its session option; no effect on other files or on VNNI)
        options.add_session_config_entry("session.x64quantprecision", "1")
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = _providers(device)
        try:
            self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime's errors are its own types (InvalidProtobuf, Fail, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise OnnxFileError(f"ONNX file {path} cannot be read by ONNX Runtime ({first[:200]}): it is not an ONNX "
                                f"file, or it is damaged; write it again with `glocalclip export CKPT --out "
                                f"{path}`") from None
        self.metadata = DeployMetadata.from_props(self.session.get_modelmeta().custom_metadata_map, path)
        self.path = path
        self.threshold = self.metadata.threshold if threshold is None else float(threshold)
        #: where the threshold comes from, in words (predict's overlays say it)
        self.threshold_source = None if self.threshold is None else \
            ("given" if threshold is not None else
             ", ".join(filter(None, (self.metadata.threshold_source, f"stored in {os.path.basename(path)}"))))
        self.batch_size = int(batch_size)

    @property
    def image_size(self) -> int:
        return self.metadata.image_size

    @property
    def weights(self) -> str:
        """How the file stores its weight matrices: float32, float16 (``--half``) or int8 (``--int8``)."""
        return self.metadata.weights

    @property
    def sigma(self) -> float:
        return self.metadata.sigma

    @property
    def map_value_range(self) -> tuple[float, float]:
        return self.metadata.map_value_range

    def run(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph alone: uint8 [B, S, S, 3] -> (pred_score [B], anomaly_map [B, S, S]) float32.

        An int8 file (``export --int8``) quantizes each product's input with one scale for the
        whole tensor, batch included, so in a batch an image's score and map would depend on the
        other images (by ~1 % of the map's range, measured): it runs one image at a time."""
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"{self.path} takes uint8 images [B, {s}, {s}, 3], got shape {pixels.shape}")
        if self.weights == "int8" and len(pixels) > 1:
            scores, amaps = zip(*(self.session.run(None, {INPUT_NAME: pixels[i:i + 1]}) for i in range(len(pixels))))
            return np.concatenate(scores), np.concatenate(amaps)
        score, amap = self.session.run(None, {INPUT_NAME: pixels})
        return score, amap

    def predict(self, images: Union[ImageInput, Iterable[ImageInput]], threshold: Optional[float] = None
                ) -> Union[Prediction, list[Prediction]]:
        """Score one image (returns a Prediction) or a sequence (returns a list), in batches.
        An unreadable image raises DatasetError."""
        return predict_images(self, images, threshold=threshold)

    def predict_uint8(self, pixels: np.ndarray, sizes: Sequence[tuple[int, int]],
                      paths: Optional[Sequence[Optional[str]]] = None, threshold: Optional[float] = None
                      ) -> list[Prediction]:
        """Score resized RGB images, uint8 [B, S, S, 3]; maps are resized to ``sizes`` [(h, w)] * B."""
        thr = threshold if threshold is not None else self.threshold
        score, amap = self.run(pixels)
        peak = amap.reshape(len(amap), -1).max(axis=1)
        score = batch_invariant_scores([float(s) for s in score], thr,
                                       lambda i: float(self.run(pixels[i:i + 1])[0][0]))
        return [Prediction(image_path=paths[i] if paths else None, pred_score=score[i],
                           pred_label=label_of(score[i], thr), map_max=float(peak[i]),
                           anomaly_map=resize_bilinear(amap[i], size))
                for i, size in enumerate(sizes)]
