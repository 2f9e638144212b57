"""Gradients reach only the prompts; a tiny model learns synthetic defects (DESIGN.md §5)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from glocalclip import GlocalCLIP
from glocalclip.synthetic import make_batch

from conftest import TINY_SIZE, tiny_config

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _prep(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD


def test_only_prompt_parameters_get_gradients_and_change(tiny_model):
    x = torch.randn(3, 3, TINY_SIZE, TINY_SIZE)
    masks = (torch.rand(3, TINY_SIZE, TINY_SIZE) > 0.9).float()
    clip_before = {k: v.clone() for k, v in tiny_model.clip.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in tiny_model.prompt_learner.state_dict().items()}
    opt = torch.optim.Adam(tiny_model.prompt_parameters(), lr=1e-3, betas=(0.5, 0.999))
    losses = tiny_model.losses(x, masks, torch.tensor([0, 1, 1]))
    assert set(losses) == {"global", "local", "contrastive", "total"}
    assert all(v.ndim == 0 for v in losses.values())
    losses["total"].backward()
    for name, p in tiny_model.named_parameters():
        if name.startswith("prompt_learner."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    opt.step()
    for k, v in tiny_model.clip.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    for k, v in tiny_model.prompt_learner.state_dict().items():
        assert not torch.equal(v, prompt_before[k]), k


def test_losses_for_a_batch_of_one_and_total_formula(tiny_model):
    x = torch.randn(1, 3, TINY_SIZE, TINY_SIZE)
    out = tiny_model.losses(x, torch.zeros(1, TINY_SIZE, TINY_SIZE), torch.tensor([0]), alpha=0.5)
    assert torch.isfinite(out["total"])
    torch.testing.assert_close(out["total"], out["local"] + out["global"] + 0.5 * out["contrastive"])


def test_mask_valid_skips_unknown_masks_in_local_loss(tiny_model):
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    masks = torch.zeros(2, TINY_SIZE, TINY_SIZE)
    labels = torch.tensor([0, 1])
    both = tiny_model.losses(x, masks, labels)
    only_first = tiny_model.losses(x, masks, labels, mask_valid=torch.tensor([True, False]))
    ref = tiny_model.losses(x[:1], masks[:1], labels[:1])
    torch.testing.assert_close(only_first["local"], ref["local"])
    torch.testing.assert_close(only_first["global"], both["global"])  # global loss keeps every image
    assert not torch.allclose(only_first["local"], both["local"])
    none = tiny_model.losses(x, masks, labels, mask_valid=torch.tensor([False, False]))
    assert none["local"].item() == 0.0


def test_tiny_model_learns_synthetic_defects(tiny_clip):
    torch.manual_seed(111)
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    imgs, masks, labels = make_batch(48, TINY_SIZE, seed=1)
    x, m, y = _prep(imgs), torch.from_numpy(masks).float(), torch.from_numpy(labels)
    test_imgs, test_masks, _ = make_batch(16, TINY_SIZE, seed=2)
    cache = [model.encode_image(x[i:i + 8]) for i in range(0, 48, 8)]

    def pixel_auroc() -> float:
        with torch.no_grad():
            amap = model(_prep(test_imgs))["anomaly_map"]
        return roc_auc_score(test_masks.ravel(), amap.numpy().ravel())

    before = pixel_auroc()
    opt = torch.optim.Adam(model.prompt_parameters(), lr=1e-3, betas=(0.5, 0.999))
    totals = []
    for step in range(50):
        i = step % len(cache)
        loss = model.losses_from_features(*cache[i], m[8 * i:8 * i + 8], y[8 * i:8 * i + 8])["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    after = pixel_auroc()
    assert np.mean(totals[-6:]) < 0.6 * np.mean(totals[:6])
    assert after > 0.85, (before, after)
    assert after > before + 0.2
