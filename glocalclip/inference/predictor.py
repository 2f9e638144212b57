"""Score your own images with the PyTorch model: the :class:`Predictor` API (``glocalclip predict
--checkpoint``), a :class:`~.detector.Detector` plus batching and maps resized to each image.

For every image: the anomaly score (the model's image score, docs/design.md §4), a predicted label
(score >= threshold, where the threshold is given explicitly, else the F1-max threshold that
``test.py`` stored beside the checkpoint (``epoch_15.pth.threshold.json``), else one embedded in a
checkpoint of an older version, else there is no label), the maximum of the smoothed anomaly map,
and the smoothed map resized back from the model's resolution to the image's own. σ follows the
one rule of ``engine.checkpoint.sigma_for``: the σ the threshold was measured with, else the paper's.

    from glocalclip import Predictor
    pred = Predictor.from_checkpoint("checkpoints/epoch_15.pth", device="cuda")
    for p in pred.predict(["a.png", "b.jpg"]):
        print(p.image_path, p.pred_score, p.pred_label, p.anomaly_map.shape)
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.checkpoint import load_model_and_checkpoint, sigma_for, stored_test_record, threshold_for
from ..engine.few_shot import FewShotChoice, load_reference
from ..model.few_shot import ReferenceBank, check_bank_target
from .detector import Detector
from .images import ImageInput, Prediction, batch_invariant_scores, predict_images


class Predictor:
    """A :class:`Detector` on a device, scoring batches of arbitrary images (an :class:`ImagePredictor`)."""

    backend = "pytorch"

    @property
    def weights(self) -> str:
        """The towers' matrix dtype (the checkpoint's ``precision``): float32, bfloat16 or float16."""
        return str(self.model.compute_dtype).removeprefix("torch.")

    def __init__(self, model, threshold: Optional[float] = None, sigma: Optional[float] = None,
                 batch_size: int = 8, device: Optional[Union[str, torch.device]] = None,
                 threshold_source: str = "given", reference: Optional[ReferenceBank] = None):
        """``sigma`` None: the paper's (``sigma_for``; :meth:`from_checkpoint` reads the stored one).
        ``reference``: a few-shot bank (``model.reference_bank`` or ``engine.few_shot.load_reference``)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.detector = Detector(self.model, sigma_for(None, sigma), threshold, threshold_source,
                                 reference=reference).eval().to(self.device)
        self.batch_size = int(batch_size)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None,
                        threshold: Optional[float] = None, sigma: Optional[float] = None, batch_size: int = 8,
                        trust: bool = False, reference: Optional[Union[str, ReferenceBank]] = None,
                        few_shot: FewShotChoice = None, save_reference: Optional[str] = None,
                        overwrite_reference: bool = False, **overrides: Any) -> "Predictor":
        """Our checkpoint (config inside), or an original GlocalCLIP/AnomalyCLIP one (settings from
        ``overrides``, prompt shapes from its tensors). ``threshold`` None: the F1-max threshold
        ``test.py`` stored beside the checkpoint, else one embedded in an older checkpoint, else no labels.
        ``sigma`` None: the σ that threshold was measured with, else the paper's (``sigma_for``). ``trust``:
        load a file even where loading it could run code (see ``glocalclip.load_model``).

        ``reference`` (few-shot, docs/design.md §11): normal images (a folder or glob) whose bank is
        built once with ``few_shot`` settings and saved to ``save_reference`` if given (an existing file
        kept unless ``overwrite_reference``), or a saved
        bank (which keeps its own settings: ``few_shot`` may give some fields, which must agree). Few-shot
        scores live on another scale than the stored zero-shot threshold, so that one is not used:
        labels come from ``threshold`` alone."""
        if save_reference is not None:
            check_bank_target(save_reference, overwrite_reference)  # before minutes of bank building
        model, ckpt = load_model_and_checkpoint(os.fspath(path), trust=trust, **overrides)
        record = stored_test_record(path, ckpt)
        sigma = sigma_for(record, sigma)
        threshold, source = threshold_for(record, threshold, few_shot=reference is not None, sigma=sigma,
                                          image_size=model.cfg.image_size)
        bank = None
        if reference is not None:
            model = model.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
            bank = reference if isinstance(reference, ReferenceBank) else \
                load_reference(model, os.fspath(reference), few_shot, batch_size)
            if save_reference is not None:
                bank.save(save_reference, overwrite=overwrite_reference)
        return cls(model, threshold=threshold, sigma=sigma, batch_size=batch_size,
                   device=device, threshold_source=source, reference=bank)

    @property
    def threshold(self) -> Optional[float]:
        return self.detector.threshold

    @property
    def threshold_source(self) -> Optional[str]:
        return self.detector.threshold_source

    @property
    def sigma(self) -> float:
        return self.detector.sigma

    @property
    def image_size(self) -> int:
        return self.detector.image_size

    @property
    def map_value_range(self) -> tuple[float, float]:
        return self.detector.map_value_range

    def predict(self, images: Union[ImageInput, Iterable[ImageInput]], threshold: Optional[float] = None
                ) -> Union[Prediction, list[Prediction]]:
        """Score one image (returns a Prediction) or a sequence (returns a list), in batches.
        An unreadable image raises :class:`DatasetError`; the CLI skips such files instead."""
        return predict_images(self, images, threshold=threshold)

    @torch.no_grad()
    def predict_uint8(self, pixels: np.ndarray, sizes: Sequence[tuple[int, int]],
                      paths: Optional[Sequence[Optional[str]]] = None, threshold: Optional[float] = None
                      ) -> list[Prediction]:
        """Score resized RGB images, uint8 [B, S, S, 3] (``read_image``'s pixels), normalised on the
        device (a quarter of the bytes cross; bit-identical to the CPU, as in testing)."""
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        return self._predictions(self.detector, x, sizes, paths, threshold)

    @torch.no_grad()
    def predict_tensors(self, x: torch.Tensor, sizes: Sequence[tuple[int, int]],
                        paths: Optional[Sequence[Optional[str]]] = None, threshold: Optional[float] = None
                        ) -> list[Prediction]:
        """Score a normalised batch [B, 3, S, S]; maps are resized to ``sizes`` [(h, w)] * B."""
        return self._predictions(self.detector.score_normalized, x.to(self.device), sizes, paths, threshold)

    def _predictions(self, detect: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor,
                     sizes: Sequence[tuple[int, int]], paths: Optional[Sequence[Optional[str]]],
                     threshold: Optional[float]) -> list[Prediction]:
        """``detect(x)``'s scores and maps as Predictions; a score near the threshold is the image's
        scored alone (``batch_invariant_scores``: the label does not depend on the batch)."""
        score, amap = detect(x)  # [B], [B, S, S]
        peak = amap.flatten(1).max(1).values
        score_list, peak_list = score.float().cpu().tolist(), peak.float().cpu().tolist()
        thr = self.threshold if threshold is None else threshold
        score_list = batch_invariant_scores(score_list, thr, lambda i: float(detect(x[i:i + 1])[0][0].float().cpu()))
        preds = []
        for i, (h, w) in enumerate(sizes):
            m = amap[i]
            if (h, w) != tuple(m.shape):
                m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            preds.append(Prediction(image_path=paths[i] if paths else None, pred_score=score_list[i],
                                    pred_label=self.detector.label(score_list[i], threshold),
                                    map_max=peak_list[i], anomaly_map=m.float().cpu().numpy()))
        return preds
