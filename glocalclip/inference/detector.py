"""The detector: one module that owns the test-time protocol (docs/design.md §4), so that testing,
``predict``, ``serve`` and the exported ONNX graph compute the same thing.

Images in (uint8 RGB [B, S, S, 3], or already normalised [B, 3, S, S]); the image score, the
smoothed anomaly map and, given a threshold, the label out. The pieces are the engine's pure
functions (``engine/smoothing.py``: smoothing, and the score fused with the smoothed map); the
detector holds them together with the text features (computed once) and the threshold with
where it came from.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..datasets.preprocess import normalize_image
from ..engine.smoothing import GaussianSmoothing, TraceableSmoothing, gaussian_kernel1d, smoothed_scores
from ..model.few_shot import BankBuffers, ReferenceBank
from .images import label_of


class Detector(nn.Module):
    """``detector(images)`` -> (pred_score [B], anomaly_map [B, S, S]), float32, as ``test.py``
    computes them with σ ``sigma``; :meth:`label` decides a label with the threshold.

    Only the vision tower is a submodule, so only its weights enter an exported graph; the text
    features, computed once here, are buffers. The model's own forward is kept as a plain callable:
    with text features given it reads ``cfg`` and the vision tower, never the text tower.

    ``traceable``: smooth in torch operations alone (float32 separable convolution) so the module can
    be exported; otherwise as testing does (scipy's own filter on the CPU, float64 on a GPU).
    """

    def __init__(self, model: nn.Module, sigma: float, threshold: Optional[float] = None,
                 threshold_source: Optional[str] = None, traceable: bool = False,
                 reference: Optional[ReferenceBank] = None):
        """``reference``: a few-shot bank (docs/design.md §11) every image is scored with; held as
        buffers, so it moves with the detector and an exported graph holds it as constants."""
        super().__init__()
        self.cfg = model.cfg
        if reference is not None:
            reference.check_fits(model.cfg)
        self.bank = BankBuffers(reference) if reference is not None else None
        self.visual = model.visual  # the frozen vision tower, shared, not copied
        self._score_images = model.forward
        with torch.no_grad():
            global_text, local_text = model.encode_text()
        self.register_buffer("global_text", global_text.detach().clone())  # [2, E]
        self.register_buffer("local_text", local_text.detach().clone())  # [2, E]
        self.sigma = float(sigma)
        self.threshold = None if threshold is None else float(threshold)
        #: where the threshold comes from, in words (overlays say it): "F1-max on mvtec test, σ 4", "given"
        self.threshold_source = None if threshold is None else (threshold_source or "given")
        self.traceable = bool(traceable)
        if self.traceable:
            grid = model.cfg.image_size // model.visual.patch_size
            model.visual.pos_embed((grid, grid))  # the positional table resized for S now: a constant in a graph
        self.register_buffer("kernel", gaussian_kernel1d(self.sigma) if self.sigma > 0 else torch.ones(1))
        self._exact: dict[torch.device, GaussianSmoothing] = {}  # per device: the kernel goes there once
        if not self.traceable:  # made now for the model's device, not by the first batch
            self._smoothing(global_text.device)

    @property
    def image_size(self) -> int:
        return int(self.cfg.image_size)

    @property
    def map_value_range(self) -> tuple[float, float]:
        """The map's full range, 0 .. number of feature layers: each adds (p_anomalous + 1 - p_normal) / 2;
        a few-shot bank adds up to its weight (a distance in [0, 1], weighted)."""
        extra = self.bank.settings.weight if self.bank is not None else 0.0
        return 0.0, float(len(self.cfg.features_list)) + extra

    def _smoothing(self, device: torch.device):
        if self.traceable:
            return TraceableSmoothing(self.kernel if self.sigma > 0 else None)
        smoothing = self._exact.get(device)
        if smoothing is None:
            smoothing = self._exact[device] = GaussianSmoothing(self.sigma, device)
        return smoothing

    def score_normalized(self, x: torch.Tensor, reference: Optional[ReferenceBank] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B, 3, S, S] -> (score [B], smoothed map [B, S, S]); with the detector's
        bank, or ``reference`` (testing's bank of the batch's class) in its place."""
        if reference is None and self.bank is not None:
            reference = self.bank.bank()
        out = self._score_images(x, text=(self.global_text, self.local_text), reference=reference)
        return smoothed_scores(out, self._smoothing(out["anomaly_map"].device), self.cfg.image_score)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 RGB [B, S, S, 3] -> (score [B], smoothed map [B, S, S]); normalised on their device."""
        return self.score_normalized(normalize_image(images.permute(0, 3, 1, 2).contiguous()))

    def label(self, score: float, threshold: Optional[float] = None) -> Optional[int]:
        """1 (anomalous) when score >= the threshold (``threshold``, else the detector's), 0 below, None without."""
        return label_of(score, self.threshold if threshold is None else threshold)
