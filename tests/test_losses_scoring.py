"""Losses against hand-computed values, scoring, smoothing against scipy (docs/design.md §4–5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from glocalclip.model.losses import dice_loss, focal_loss, glocal_contrastive_loss, local_loss
from glocalclip.engine.smoothing import gaussian_kernel1d, gaussian_smooth, separable_smooth
from glocalclip.model.layers import LayerFeatures
from glocalclip.model.scoring import anomaly_map, layer_probability_maps, patch_probabilities


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


def _pair_d(x, y) -> float:
    """docs/design.md §5: d(x, y) = ||x - y + 1e-6||_2, in float64 numpy."""
    return float(np.linalg.norm(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64) + 1e-6))


def test_contrastive_loss_hand_computed():
    # asymmetric on purpose: all four distances differ, so swapping which pairs are pulled and
    # which are pushed (or which anchor goes with which local prompt) changes the value
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    l = torch.tensor([[0.6, 0.8], [0.28, 0.96]], dtype=torch.float64)
    d_nn, d_na = _pair_d(g[0], l[0]), _pair_d(g[0], l[1])
    d_aa, d_an = _pair_d(g[1], l[1]), _pair_d(g[1], l[0])
    dists = [d_nn, d_na, d_aa, d_an]
    assert min(abs(a - b) for i, a in enumerate(dists) for b in dists[i + 1:]) > 0.1
    pull = d_nn ** 2 + d_aa ** 2  # same state: global normal-local normal, global anomalous-local anomalous
    assert glocal_contrastive_loss(g, l, 0.0).item() == pytest.approx(pull, rel=1e-9)
    for m, n_active in ((1.0, 1), (1.5, 2)):  # opposite states pushed past the margin
        push = max(0.0, m - d_na) ** 2 + max(0.0, m - d_an) ** 2
        assert sum(m - d > 0 for d in (d_na, d_an)) == n_active
        assert glocal_contrastive_loss(g, l, m).item() == pytest.approx(pull + push, rel=1e-9)


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
    # as layer data (m1 shared by three layers): its term once, times three, bit for bit
    shared = local_loss(LayerFeatures((m2, m1), (1, 3)), mask)
    assert torch.equal(shared, torch.zeros(()) + two + 3 * one)


def test_anomaly_map_and_probabilities_by_hand():
    torch.manual_seed(0)
    tokens = torch.randn(1, 5, 3)  # CLS + 2×2 grid
    text = torch.nn.functional.normalize(torch.randn(2, 3), dim=-1)
    probs = patch_probabilities(tokens, text, 0.07)
    p = tokens[0, 1:] / tokens[0, 1:].norm(dim=-1, keepdim=True)
    ref = torch.softmax(p @ text.t() / 0.07, dim=-1)  # [4, 2]
    torch.testing.assert_close(probs[0].permute(1, 2, 0).reshape(4, 2), ref)
    maps = layer_probability_maps(LayerFeatures((tokens,), (2,)), text, 2, 0.07)  # one tensor, two layers
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
    from glocalclip.engine.smoothing import smoothed_scores

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


def test_probabilities_upsample_bilinearly_to_the_image():
    """docs/design.md §4: the G×G class probabilities are upsampled bilinearly (align_corners=False):
    a 2×2 grid to 8×8, so 'nearest' or align_corners=True would give other values."""
    torch.manual_seed(3)
    tokens = torch.randn(2, 5, 4)  # CLS + 2×2 grid
    text = F.normalize(torch.randn(2, 4), dim=-1)
    p = F.normalize(tokens[:, 1:], dim=-1)
    grid = torch.softmax(p @ text.t() / 0.07, dim=-1).reshape(2, 2, 2, 2).permute(0, 3, 1, 2)  # [B,2,G,G]
    want = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    maps = layer_probability_maps([tokens], text, 8, 0.07)
    assert maps[0].shape == (2, 2, 8, 8)
    torch.testing.assert_close(maps[0], want)
    # the check has teeth: the other modes differ from it
    assert (want - F.interpolate(grid, size=(8, 8), mode="nearest")).abs().max() > 1e-3
    assert (want - F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=True)).abs().max() > 1e-3
    torch.testing.assert_close(anomaly_map(maps), (want[:, 1] + 1 - want[:, 0]) / 2)


# ---------------------------------------------------------------------------------------------
# The model's scoring and losses, rebuilt by hand from docs/design.md §4–5 with plain torch ops.

TAU = 0.07  # docs/design.md §4: temperature 0.07 everywhere


def _hand_layer_maps(patch_feats, local_text, size):
    """Per selected layer S [B,2,H,W]: softmax(p̂·[l_n,l_a]/τ) on the patch rows (class row dropped),
    reshaped row-major to G×G, upsampled bilinearly (align_corners=False) to the image."""
    out = []
    for tokens in patch_feats:
        p = F.normalize(tokens[:, 1:].double(), dim=-1)
        probs = torch.softmax(p @ local_text.double().t() / TAU, dim=-1)  # [B, G², 2]
        b, n, _ = probs.shape
        side = int(round(n ** 0.5))
        grid = probs.reshape(b, side, side, 2).permute(0, 3, 1, 2)
        out.append(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False))
    return out


def _hand_focal(S, M, s=1e-5):
    """docs/design.md §5: p' = (1-s)·S_true + s·S_other + s, loss = -(1-p')²·ln p', mean over all pixels."""
    s_true = torch.where(M > 0.5, S[:, 1], S[:, 0])
    s_other = torch.where(M > 0.5, S[:, 0], S[:, 1])
    pt = (1 - s) * s_true + s * s_other + s
    return (-(1 - pt) ** 2 * torch.log(pt)).mean()


def _hand_dice(P, T):
    """docs/design.md §5: 1 - mean_b (2ΣPT + 1) / (ΣP + ΣT + 1)."""
    P, T = P.flatten(1), T.flatten(1)
    return 1 - ((2 * (P * T).sum(1) + 1) / (P.sum(1) + T.sum(1) + 1)).mean()


def _hand_contrastive(g, l, m):
    def d(x, y):
        return torch.linalg.vector_norm(x - y + 1e-6)
    return (d(g[0], l[0]) ** 2 + torch.clamp(m - d(g[0], l[1]), min=0) ** 2
            + d(g[1], l[1]) ** 2 + torch.clamp(m - d(g[1], l[0]), min=0) ** 2)


def _hand_masks(b, size, seed):
    """Box-shaped defects in {0,1} (the first image normal)."""
    rng = np.random.default_rng(seed)
    m = torch.zeros(b, size, size)
    for i in range(1, b):
        y0, x0 = rng.integers(0, size // 2, size=2)
        h, w = rng.integers(size // 8, size // 2, size=2)
        m[i, y0:y0 + h, x0:x0 + w] = 1
    return m


def test_forward_image_score_and_map_follow_the_spec(tiny_clip):
    """docs/design.md §4: image score = softmax(f̂·[g_n,g_a]/0.07)[1] with the GLOBAL text; the map from
    the patch tokens with the LOCAL text, per layer (p_a + 1 - p_n)/2, summed over the layers."""
    from glocalclip import GlocalCLIP

    from conftest import TINY_SIZE, tiny_config

    torch.manual_seed(5)
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    x = torch.randn(3, 3, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        f, patches = model.encode_image(x)
        g, l = model.encode_text()
        out = model(x)
    assert len(patches) == 4 and out["anomaly_map"].shape == (3, TINY_SIZE, TINY_SIZE)
    # global and local prompts must give distinguishable answers, or a swap could not show
    assert (g - l).abs().max() > 1e-2

    f_hat = F.normalize(f.double(), dim=-1)
    score = torch.softmax(f_hat @ g.double().t() / TAU, dim=-1)[:, 1]
    torch.testing.assert_close(out["image_score"].double(), score, rtol=1e-5, atol=1e-6)

    amap = sum((S[:, 1] + 1 - S[:, 0]) / 2 for S in _hand_layer_maps(patches, l, TINY_SIZE))
    torch.testing.assert_close(out["anomaly_map"].double(), amap, rtol=1e-5, atol=1e-5)

    # the text passed in is the text used (one encode_text per checkpoint at test time)
    with torch.no_grad():
        out2 = model(x, text=(g, l))
    torch.testing.assert_close(out2["image_score"], out["image_score"])
    torch.testing.assert_close(out2["anomaly_map"], out["anomaly_map"])


@pytest.mark.parametrize("multilayer", ["reference", "snapshot"])
def test_each_loss_term_follows_the_spec(tiny_clip, multilayer):
    """docs/design.md §5, term by term: global = CE(f̂·[g_n,g_a]/0.07, label) (GLOBAL text); local =
    Σ_layers Focal(S, M) + Dice(S_a, M) + Dice(S_n, 1-M) on maps from the LOCAL text; contrastive
    with the margin; total = local + global + α·contrastive (α ≠ 1, margin ≠ 0)."""
    from glocalclip import GlocalCLIP

    from conftest import TINY_SIZE, tiny_config

    torch.manual_seed(7)
    model = GlocalCLIP(tiny_config(multilayer=multilayer), clip=tiny_clip)
    x = torch.randn(3, 3, TINY_SIZE, TINY_SIZE)
    masks = _hand_masks(3, TINY_SIZE, seed=1)
    labels = torch.tensor([0, 1, 1])
    alpha, margin = 0.3, 1.5

    f, patches = model.encode_image(x)
    with torch.no_grad():
        g, l = model.encode_text()
    g64, l64 = g.double(), l.double()

    z = F.normalize(f.double(), dim=-1) @ g64.t() / TAU
    glob = F.cross_entropy(z, labels)
    loc = sum(_hand_focal(S, masks.double()) + _hand_dice(S[:, 1], masks.double())
              + _hand_dice(S[:, 0], 1 - masks.double()) for S in _hand_layer_maps(patches, l, TINY_SIZE))
    con = _hand_contrastive(g64, l64, margin)
    # the push terms are active (margin > distance), so a margin that does not arrive shows
    assert _hand_contrastive(g64, l64, margin) - _hand_contrastive(g64, l64, 0.0) > 1e-3

    for out in (model.losses(x, masks, labels, alpha=alpha, margin=margin),
                model.losses_from_features(f, patches, masks, labels, alpha, margin)):
        assert out["global"].item() == pytest.approx(glob.item(), rel=1e-5)
        assert out["local"].item() == pytest.approx(loc.item(), rel=1e-5)
        assert out["contrastive"].item() == pytest.approx(con.item(), rel=1e-5)
        assert out["total"].item() == pytest.approx((loc + glob + alpha * con).item(), rel=1e-5)
