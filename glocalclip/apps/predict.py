"""Score your own images with the PyTorch model: the :class:`Predictor` API (``glocalclip predict
--checkpoint``; the command line itself is ``predict_cli.py``).

For every image: the anomaly score (the model's image score, docs/design.md §4), a predicted label
(score >= threshold, where the threshold is given explicitly, else the F1-max threshold that
``test.py`` stored beside the checkpoint (``epoch_15.pth.threshold.json``), else one embedded in a
checkpoint of an older version, else there is no label), the maximum of the smoothed anomaly map,
and the smoothed map resized back from the model's resolution to the image's own.

    from glocalclip import Predictor
    pred = Predictor.from_checkpoint("checkpoints/epoch_15.pth", device="cuda")
    for p in pred.predict(["a.png", "b.jpg"]):
        print(p.image_path, p.pred_score, p.pred_label, p.anomaly_map.shape)

Inputs are read, and outputs written, by ``predict_io.py``, which the torch-free ONNX runtime
(``glocalclip.deploy.OnnxPredictor``) shares.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.preprocess import normalize_image
from ..engine.smoothing import GaussianSmoothing, smoothed_scores
from .predict_io import (FIELDS, IMAGE_EXTENSIONS, ImageInput, Prediction, batch_invariant_scores,  # noqa: F401
                         expand_inputs, label_of, output_names, predict_images, write_predictions)


class Predictor:
    """A model with its text features computed once, scoring batches of arbitrary images."""

    def __init__(self, model, threshold: Optional[float] = None, sigma: float = 8.0, batch_size: int = 8,
                 device: Optional[Union[str, torch.device]] = None, threshold_source: str = "given"):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.threshold = None if threshold is None else float(threshold)
        #: where the threshold comes from, in words (overlays say it): "F1-max on mvtec test, σ 8", "given"
        self.threshold_source = None if threshold is None else threshold_source
        self.sigma = float(sigma)
        self.batch_size = int(batch_size)
        self._smoothing: dict[float, GaussianSmoothing] = {}  # per σ: the kernel goes to the device once
        with torch.no_grad():
            self.text = self.model.encode_text()  # once per predictor

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                        threshold: Optional[float] = None, sigma: Optional[float] = 8.0, batch_size: int = 8,
                        trust: bool = False, **overrides: Any) -> "Predictor":
        """Our checkpoint (config inside), or an original GlocalCLIP/AnomalyCLIP one (settings from
        ``overrides``, prompt shapes from its tensors). ``threshold`` None: the F1-max threshold
        ``test.py`` stored beside the checkpoint, else one embedded in an older checkpoint, else no labels.
        ``sigma`` None: the σ that threshold was measured with (8 where none is stored). ``trust``: load a
        file even where loading it could run code (see ``glocalclip.load_model``)."""
        from ..engine.checkpoint import load_model_and_checkpoint, stored_test_record, tested_sigma, threshold_source

        model, ckpt = load_model_and_checkpoint(os.fspath(path), trust=trust, **overrides)
        record = stored_test_record(path, ckpt)
        sigma = tested_sigma(record) if sigma is None else sigma
        source = "given"
        if threshold is None:
            threshold, source = (None, "") if record is None else (record["image_score"], threshold_source(record))
        return cls(model, threshold=threshold, sigma=sigma, batch_size=batch_size, device=device,
                   threshold_source=source)

    @property
    def image_size(self) -> int:
        return int(self.model.cfg.image_size)

    @property
    def map_value_range(self) -> tuple[float, float]:
        """The map's full range, 0 .. number of feature layers: each adds (p_anomalous + 1 - p_normal) / 2."""
        return 0.0, float(len(self.model.cfg.features_list))

    def predict(self, images: Union[ImageInput, Iterable[ImageInput]], sigma: Optional[float] = None,
                threshold: Optional[float] = None) -> Union[Prediction, list[Prediction]]:
        """Score one image (returns a Prediction) or a sequence (returns a list), in batches.
        An unreadable image raises :class:`DatasetError`; the CLI skips such files instead."""
        return predict_images(self, images, sigma=sigma, threshold=threshold)

    def predict_uint8(self, pixels: np.ndarray, sizes: Sequence[tuple[int, int]],
                      paths: Optional[Sequence[Optional[str]]] = None, sigma: Optional[float] = None,
                      threshold: Optional[float] = None) -> list[Prediction]:
        """Score resized RGB images, uint8 [B, S, S, 3] (``read_image``'s pixels), normalised on the
        device (a quarter of the bytes cross; bit-identical to the CPU, as in testing)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).contiguous()
        return self.predict_tensors(normalize_image(x), sizes, paths, sigma=sigma, threshold=threshold)

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
        x = x.to(self.device)

        def forward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return smoothed_scores(self.model(batch, text=self.text), smoothing,
                                   self.model.cfg.image_score)  # exactly as test.py

        score, amap = forward(x)  # [B], [B, S, S]
        peak = amap.flatten(1).max(1).values
        score, peak = score.float().cpu().tolist(), peak.float().cpu().tolist()
        score = batch_invariant_scores(score, thr, lambda i: float(forward(x[i:i + 1])[0][0].float().cpu()))
        preds = []
        for i, (h, w) in enumerate(sizes):
            m = amap[i]
            if (h, w) != tuple(m.shape):
                m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            preds.append(Prediction(image_path=paths[i] if paths else None, pred_score=score[i],
                                    pred_label=label_of(score[i], thr),
                                    map_max=peak[i], anomaly_map=m.float().cpu().numpy()))
        return preds


def checkpoint_threshold(path: Union[str, os.PathLike], ckpt: dict) -> Optional[float]:
    """The threshold of the sidecar ``test.py`` wrote beside ``path`` (if it belongs to these
    contents), else the one embedded in an older checkpoint, else None."""
    from ..engine.checkpoint import stored_test_record

    record = stored_test_record(path, ckpt)
    return None if record is None else record["image_score"]


def __getattr__(name: str) -> Any:
    """``predict_main`` / ``predict_parser`` lived here before the command moved to ``predict_cli.py``;
    the old names still resolve, without this module importing the command line."""
    if name in ("predict_main", "predict_parser"):
        from . import predict_cli

        return getattr(predict_cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
