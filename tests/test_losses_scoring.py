"""Losses against hand-computed values, scoring, smoothing against scipy (DESIGN.md §4–5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from glocalclip.losses import dice_loss, focal_loss, glocal_contrastive_loss, local_loss
from glocalclip.scoring import (anomaly_map, gaussian_kernel1d, gaussian_smooth, layer_probability_maps,
                                patch_probabilities, separable_smooth)


def test_focal_loss_hand_computed():
    # two pixels: p(anomalous) = 0.8 with target 1, and 0.3 with target 0
    p1 = torch.tensor([0.8, 0.3])
    probs = torch.stack([1 - p1, p1]).reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    s = 1e-5
    pt_a = (1 - s) * 0.8 + s * 0.2 + s
    pt_b = (1 - s) * 0.7 + s * 0.3 + s
    want = (-(1 - pt_a) ** 2 * math.log(pt_a) - (1 - pt_b) ** 2 * math.log(pt_b)) / 2
    assert focal_loss(probs, target).item() == pytest.approx(want, rel=1e-6)


def test_dice_loss_hand_computed():
    pred = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    d0 = (2 * 1.5 + 1) / (1.75 + 2 + 1)
    d1 = (0 + 1) / (0 + 0 + 1)
    assert dice_loss(pred, target).item() == pytest.approx(1 - (d0 + d1) / 2, rel=1e-6)


def test_contrastive_loss_hand_computed():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    l = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    def d(x, y):
        return float(np.linalg.norm(np.asarray(x) - np.asarray(y) + 1e-6))
    pull = d(g[0], l[0]) ** 2 + d(g[1], l[1]) ** 2
    assert glocal_contrastive_loss(g, l, 0.0).item() == pytest.approx(pull, rel=1e-6)
    m = 1.0
    push = max(0, m - d(g[0], l[1])) ** 2 + max(0, m - d(g[1], l[0])) ** 2
    assert push > 0
    assert glocal_contrastive_loss(g, l, m).item() == pytest.approx(pull + push, rel=1e-6)


def test_local_loss_counts_shared_layers():
    torch.manual_seed(0)
    a = torch.rand(2, 1, 8, 8)
    m1 = torch.cat([1 - a, a], 1)
    b = torch.rand(2, 1, 8, 8)
    m2 = torch.cat([1 - b, b], 1)
    mask = (torch.rand(2, 8, 8) > 0.7).float()
    one = focal_loss(m1, mask) + dice_loss(m1[:, 1], mask) + dice_loss(m1[:, 0], 1 - mask)
    two = focal_loss(m2, mask) + dice_loss(m2[:, 1], mask) + dice_loss(m2[:, 0], 1 - mask)
    got = local_loss([m2, m1, m1, m1], mask)
    assert got.item() == pytest.approx((two + 3 * one).item(), rel=1e-6)


def test_anomaly_map_and_probabilities_by_hand():
    torch.manual_seed(0)
    tokens = torch.randn(1, 5, 3)  # CLS + 2×2 grid
    text = torch.nn.functional.normalize(torch.randn(2, 3), dim=-1)
    probs = patch_probabilities(tokens, text, 0.07)
    p = tokens[0, 1:] / tokens[0, 1:].norm(dim=-1, keepdim=True)
    ref = torch.softmax(p @ text.t() / 0.07, dim=-1)  # [4, 2]
    torch.testing.assert_close(probs[0].permute(1, 2, 0).reshape(4, 2), ref)
    maps = layer_probability_maps([tokens, tokens], text, 2, 0.07)
    assert maps[0] is maps[1]
    amap = anomaly_map(maps)
    single = (probs[0, 1] + 1 - probs[0, 0]) / 2
    torch.testing.assert_close(amap[0], 2 * single)


@pytest.mark.parametrize("sigma", [4, 8])
@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 37, 50), (2, 20, 20), (2, 518, 518)])  # 20 < radius 32: reflect repeats
def test_gaussian_smooth_equals_scipy(sigma, shape):
    rng = np.random.default_rng(sigma)
    maps = rng.random(shape).astype(np.float32) * 4
    ours = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
    ref = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
    assert ours.dtype == np.float32
    assert np.array_equal(ours, ref)  # on the CPU it is the original's own scipy call
    # the convolution used on GPUs: float64 (CUDA), rounded to float32 after each pass as scipy does,
    # equals scipy bit for bit (without that rounding ~5 % of values were one ulp off); float32 within 1e-5
    k64 = gaussian_kernel1d(sigma, dtype=torch.float64)
    conv64 = separable_smooth(torch.from_numpy(maps), k64).numpy()
    assert np.array_equal(conv64, ref)
    conv32 = separable_smooth(torch.from_numpy(maps), gaussian_kernel1d(sigma)).numpy()
    np.testing.assert_allclose(conv32, ref, atol=1e-5, rtol=0)
    assert conv32.dtype == conv64.dtype == np.float32


def test_global_plus_max_fuses_with_the_smoothed_map(tiny_clip):
    from glocalclip import GlocalCLIP
    from glocalclip.scoring import smoothed_scores

    from conftest import TINY_SIZE, tiny_config

    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(image_score="global+max"), clip=tiny_clip)
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    out = model(x)
    torch.testing.assert_close(out["image_score"], out["global_score"] + out["anomaly_map"].flatten(1).max(1).values)
    score, amap = smoothed_scores(out, 4, "global+max")
    torch.testing.assert_close(amap, gaussian_smooth(out["anomaly_map"], 4))
    torch.testing.assert_close(score, out["global_score"] + amap.flatten(1).max(1).values)
    plain, _ = smoothed_scores(out, 4, "global")
    assert torch.equal(plain, out["image_score"])
    assert (score < out["image_score"]).all()  # smoothing lowers the peak
