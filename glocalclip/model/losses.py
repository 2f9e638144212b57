"""Training losses (docs/design.md §5): focal and dice on each local map, cross-entropy on the
global branch, and the glocal contrastive loss that ties global and local prompts together."""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .layers import LayerFeatures


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on *probabilities* [B, C, H, W] with integer targets [B, H, W].

    As the original: the one-hot target is clamped to [s/(C-1), 1-s], p′ = Σ onehot·p + s,
    loss = −(1 − p′)^γ · ln p′, mean over all pixels (α = 1).
    """
    c = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, c)
    t = target.reshape(-1).long()
    one_hot = F.one_hot(t, c).to(p.dtype).clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(dim=1) + smooth
    return (-(1 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − mean_b (2·ΣPT + 1) / (ΣP + ΣT + 1) over [B, H, W] inputs."""
    b = pred.shape[0]
    p = pred.reshape(b, -1)
    t = target.reshape(b, -1).to(p.dtype)
    dice = (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    return 1 - dice.sum() / b


def local_loss(prob_maps: Union[LayerFeatures, Sequence[torch.Tensor]], masks: torch.Tensor) -> torch.Tensor:
    """Σ_layers Focal(S, M) + Dice(S[:,1], M) + Dice(S[:,0], 1 − M).

    A weighted sum over the distinct maps: each term is computed once and multiplied by its count
    (a map shared by k layers under ``multilayer="reference"``, docs/design.md §2.4).
    """
    total = masks.new_zeros((), dtype=torch.float32)
    for m, k in LayerFeatures.of(prob_maps).weighted():
        term = focal_loss(m, masks) + dice_loss(m[:, 1], masks) + dice_loss(m[:, 0], 1 - masks)
        total = total + (term if k == 1 else k * term)
    return total


def pair_distance(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """‖x − y + eps‖₂ (``F.pairwise_distance`` semantics)."""
    return (x - y + eps).norm(p=2, dim=-1)


def glocal_contrastive_loss(global_text: torch.Tensor, local_text: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Global prompts as anchors: pull same-state local prompts close, push opposite ones past ``margin``.

    L = d(g_n,l_n)² + max(0, m − d(g_n,l_a))² + d(g_a,l_a)² + max(0, m − d(g_a,l_n))².
    """
    g_n, g_a = global_text[0], global_text[1]
    l_n, l_a = local_text[0], local_text[1]
    pull = pair_distance(g_n, l_n).pow(2) + pair_distance(g_a, l_a).pow(2)
    push = (margin - pair_distance(g_n, l_a)).clamp(min=0).pow(2) + \
           (margin - pair_distance(g_a, l_n)).clamp(min=0).pow(2)
    return pull + push
