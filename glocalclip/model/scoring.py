"""From features to scores: image score, per-layer probability maps and the anomaly map
(docs/design.md §4). The test protocol's Gaussian smoothing is ``engine/smoothing.py``."""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .layers import LayerFeatures


def image_logits(image_features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    f = image_features.float()
    f = f / f.norm(dim=-1, keepdim=True)
    return f @ text.float().t() / temperature


def patch_probabilities(patch_tokens: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per patch softmax over [normal, anomalous], class row dropped -> [B, 2, G, G]."""
    p = patch_tokens.float()
    p = p / p.norm(dim=-1, keepdim=True)
    probs = (p @ text.float().t() / temperature).softmax(dim=-1)[:, 1:]
    b, n, _ = probs.shape
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"{n} patch tokens do not form a square grid")
    return probs.reshape(b, side, side, 2).permute(0, 3, 1, 2)


def layer_probability_maps(patch_feats: Union[LayerFeatures, Sequence[torch.Tensor]], text: torch.Tensor,
                           image_size: int, temperature: float) -> LayerFeatures:
    """Per layer, the class probabilities upsampled bilinearly to the image: [B, 2, H, W].

    Computed once per distinct tensor; a shared layer keeps its count (docs/design.md §2.4).
    """
    def upsampled(tokens: torch.Tensor) -> torch.Tensor:
        probs = patch_probabilities(tokens, text, temperature)  # [B, 2, G, G]
        return F.interpolate(probs, size=(image_size, image_size), mode="bilinear", align_corners=False)

    return LayerFeatures.of(patch_feats).map(upsampled)


def anomaly_map(prob_maps: Union[LayerFeatures, Sequence[torch.Tensor]]) -> torch.Tensor:
    """Σ_layers (p_anomalous + 1 − p_normal) / 2 -> [B, H, W] (unsmoothed).

    Each distinct map is formed once and then added as many times as it is counted, one addition
    per layer in layer order: the original's sequential sum, bit for bit (k·m would round otherwise).
    """
    total = None
    for m, k in LayerFeatures.of(prob_maps).weighted():
        per_layer = (m[:, 1] + 1 - m[:, 0]) / 2
        for _ in range(k):
            total = per_layer if total is None else total + per_layer
    return total


def final_image_score(global_probability: torch.Tensor, amap: torch.Tensor, mode: str) -> torch.Tensor:
    """The final image score [B] for ``image_score`` ``mode`` (docs/design.md §4): the global
    branch's probability, plus the map's maximum with the opt-in ``"global+max"``. The one place
    the two are fused; the test protocol passes the smoothed map, ``forward`` the raw one."""
    if mode == "global+max":
        return global_probability + amap.flatten(1).max(dim=1).values
    if mode == "global":
        return global_probability
    raise ValueError(f"unknown image_score mode {mode!r}")
