"""From features to scores: image score, per-layer probability maps and the anomaly map
(DESIGN.md §4). The test protocol's Gaussian smoothing is ``engine/smoothing.py``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def image_probabilities(image_features: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax([f̂·t_normal, f̂·t_anomalous] / τ) -> [B, 2]; f̂ is the normalised image feature."""
    return (image_logits(image_features, text, temperature)).softmax(dim=-1)


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


def layer_probability_maps(patch_feats: list[torch.Tensor], text: torch.Tensor, image_size: int,
                           temperature: float) -> list[torch.Tensor]:
    """Per selected layer, the class probabilities upsampled bilinearly to the image: [B, 2, H, W].

    Layers that share one tensor (``multilayer="reference"``) share one result object, so the
    work is done once; summing them gives the same numbers as computing each.
    """
    done: dict[int, torch.Tensor] = {}
    maps = []
    for tokens in patch_feats:
        key = id(tokens)
        if key not in done:
            probs = patch_probabilities(tokens, text, temperature)
            done[key] = F.interpolate(probs, size=(image_size, image_size), mode="bilinear",
                                      align_corners=False)
        maps.append(done[key])
    return maps


def anomaly_map(prob_maps: list[torch.Tensor]) -> torch.Tensor:
    """Σ_layers (p_anomalous + 1 − p_normal) / 2 -> [B, H, W] (unsmoothed)."""
    per_object: dict[int, torch.Tensor] = {}
    total = None
    for m in prob_maps:
        if id(m) not in per_object:
            per_object[id(m)] = (m[:, 1] + 1 - m[:, 0]) / 2
        total = per_object[id(m)] if total is None else total + per_object[id(m)]
    return total


def fuse_image_score(global_probability: torch.Tensor, amap: torch.Tensor) -> torch.Tensor:
    """``image_score="global+max"``: the global probability plus the map's maximum (opt-in)."""
    return global_probability + amap.flatten(1).max(dim=1).values
