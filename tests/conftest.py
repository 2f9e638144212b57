"""Shared fixtures: a tiny random-weight CLIP (built once) and tiny GlocalCLIP configs."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from glocalclip import GlocalCLIP, GlocalCLIPConfig  # noqa: E402
from glocalclip.model.backbone import create_backbone  # noqa: E402

TINY_SIZE = 112  # 8×8 patch grid, not the tiny config's native 4×4: positional tables get resized


def tiny_config(**changes) -> GlocalCLIPConfig:
    base = dict(backbone="tiny", pretrained=None, image_size=TINY_SIZE, features_list=(2, 4, 6, 8),
                dpam_layer=6, n_ctx=5, ab_ctx=3, depth=3, t_n_ctx=2)
    base.update(changes)
    return GlocalCLIPConfig(**base)


@pytest.fixture(scope="session")
def tiny_clip():
    torch.manual_seed(1234)
    return create_backbone("tiny", None)


@pytest.fixture()
def tiny_model(tiny_clip):
    torch.manual_seed(0)
    return GlocalCLIP(tiny_config(), clip=tiny_clip)
