"""Running the model: training with the feature cache, zero-shot evaluation, metrics, smoothing,
checkpoints, loaders and torchrun processes."""
from . import metrics

__all__ = ["metrics"]
