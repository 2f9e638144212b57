"""What every predictor answers to: the PyTorch :class:`~glocalclip.inference.predictor.Predictor`
and the ONNX Runtime :class:`~glocalclip.deploy.runtime.OnnxPredictor` both implement
:class:`ImagePredictor`, so ``predict`` and ``serve`` use either without telling them apart."""
from __future__ import annotations

from typing import Iterable, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from .images import ImageInput, Prediction


@runtime_checkable
class ImagePredictor(Protocol):
    """Scores images: each a :class:`Prediction` (score, label, map at the image's size)."""

    backend: str  # "pytorch" or "onnxruntime", for /healthz and messages
    weights: str  # how the weight matrices are held: float32, bfloat16, float16 or int8 (an --int8 export)
    batch_size: int
    threshold: Optional[float]
    threshold_source: Optional[str]  # where the threshold comes from, in words

    @property
    def image_size(self) -> int: ...

    @property
    def sigma(self) -> float: ...

    @property
    def map_value_range(self) -> tuple[float, float]: ...

    def predict(self, images: Union[ImageInput, Iterable[ImageInput]], threshold: Optional[float] = None
                ) -> Union[Prediction, list[Prediction]]: ...

    def predict_uint8(self, pixels: np.ndarray, sizes: Sequence[tuple[int, int]],
                      paths: Optional[Sequence[Optional[str]]] = None, threshold: Optional[float] = None
                      ) -> list[Prediction]: ...
