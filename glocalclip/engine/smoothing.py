"""The test protocol's Gaussian smoothing of anomaly maps, with scipy's exact semantics (docs/design.md §4)."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from ..model.scoring import final_image_score


def smoothed_scores(out: dict[str, torch.Tensor], sigma: "float | Callable[[torch.Tensor], torch.Tensor]",
                    image_score: str = "global") -> tuple[torch.Tensor, torch.Tensor]:
    """The test protocol on a forward's output: the map smoothed with σ, and the image score of
    :func:`final_image_score` on the *smoothed* map. Returns (score [B], map [B,H,W]).
    Loops over batches pass a smoothing made once instead of σ (a :class:`GaussianSmoothing`, or
    :class:`TraceableSmoothing` for an exported graph)."""
    smooth = sigma if callable(sigma) else GaussianSmoothing(sigma, out["anomaly_map"].device)
    amap = smooth(out["anomaly_map"])
    if image_score != "global+max":
        return out["image_score"], amap  # nothing to fuse: forward's score as it is
    return final_image_score(out["global_score"], amap, image_score), amap


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """scipy.ndimage's Gaussian weights, computed as scipy does in float64: radius
    int(truncate·σ + 0.5), exp(−0.5/σ² · x²), normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 / (float(sigma) * float(sigma)) * x ** 2)
    return (w / w.sum()).to(device=device, dtype=dtype)


def _symmetric_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices padding a length-n axis by ``radius`` with scipy's "reflect" (d c b a | a b c d),
    repeating for radii longer than the axis."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def convolution_dtype(device: torch.device | str) -> torch.dtype:
    """float64 on CUDA: cuDNN runs float32 convolutions in TF32 (a 10-bit mantissa) by default on
    Ampere and later GPUs, ~1e-3 off scipy; in float64, rounded as scipy rounds, it is scipy's result."""
    return torch.float64 if torch.device(device).type == "cuda" else torch.float32


def gaussian_smooth(maps: torch.Tensor, sigma: float, truncate: float = 4.0,
                    kernel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Smooth each 2-D map of [..., H, W] like ``scipy.ndimage.gaussian_filter(m, sigma)`` (mode
    "reflect" = half-sample symmetric, truncate 4.0); float32 out. σ <= 0 returns a copy.

    On the CPU this *is* scipy's call, map by map, as the original code made it (bit-identical).
    Elsewhere it is a separable convolution on the maps' device with scipy's padding, in
    :func:`convolution_dtype`; ``kernel`` is :func:`gaussian_kernel1d` of (σ, truncate) in that
    dtype, made once by :class:`GaussianSmoothing` so no batch waits for a copy to the device."""
    if sigma <= 0:
        return maps.clone()
    if maps.device.type == "cpu":
        return _scipy_smooth(maps, sigma, truncate)
    dtype = convolution_dtype(maps.device)
    if kernel is None:
        kernel = gaussian_kernel1d(sigma, truncate, maps.device, dtype)
    return separable_smooth(maps, kernel.to(maps.device, dtype))


def separable_smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each 2-D map of [..., H, W] with the symmetric 1-D ``kernel`` along H then W, padding
    as scipy's "reflect", computing in the kernel's dtype; float32 out.

    Each pass is rounded to float32, as scipy writes its first pass into the float32 output before
    the second reads it: with a float64 kernel that makes the result equal scipy's bit for bit (float64
    sums in another order round to the same float32 but at near-ties, never seen in tests)."""
    shape = maps.shape
    h, w = shape[-2:]
    k = kernel
    r = (k.numel() - 1) // 2
    x = maps.reshape(-1, 1, h, w).to(k.dtype)
    x = x.index_select(2, _symmetric_index(h, r, x.device))
    x = F.conv2d(x, k.view(1, 1, -1, 1)).float().to(k.dtype)
    x = x.index_select(3, _symmetric_index(w, r, x.device))
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return x.reshape(shape).float()


def _scipy_smooth(maps: torch.Tensor, sigma: float, truncate: float) -> torch.Tensor:
    arr = maps.detach().float().numpy()
    flat = arr.reshape(-1, *arr.shape[-2:])
    out = [gaussian_filter(m, sigma=sigma, truncate=truncate) for m in flat]
    return torch.from_numpy(np.stack(out).reshape(arr.shape) if out else flat.copy().reshape(arr.shape))


class GaussianSmoothing:
    """:func:`gaussian_smooth` with σ fixed and, off the CPU, its weights put on the device once:
    copying them over for every batch would make each batch wait for the device to finish the
    previous one."""

    def __init__(self, sigma: float, device: torch.device | str = "cpu", truncate: float = 4.0):
        self.sigma = float(sigma)
        self.truncate = float(truncate)
        on_cpu = torch.device(device).type == "cpu"
        self.kernel = None if self.sigma <= 0 or on_cpu else \
            gaussian_kernel1d(self.sigma, self.truncate, device, convolution_dtype(device))

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        return gaussian_smooth(maps, self.sigma, self.truncate, kernel=self.kernel)


class TraceableSmoothing:
    """:func:`separable_smooth` with scipy's weights in float32, in torch operations alone, so that it
    can be traced into an ONNX graph (scipy cannot); within ~1e-6 of :class:`GaussianSmoothing`.
    σ <= 0: no smoothing."""

    def __init__(self, kernel: Optional[torch.Tensor]):
        self.kernel = kernel  # [2r+1] float32, or None for no smoothing

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        return maps if self.kernel is None else separable_smooth(maps, self.kernel)
