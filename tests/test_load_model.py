"""One loader for every checkpoint layout (``load_model`` over the pure ``adapt_checkpoint``), and the
threshold sidecar that test.py writes instead of rewriting its checkpoint."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from glocalclip import GlocalCLIP, load_model
from glocalclip.inference.predictor import Predictor
from glocalclip.engine.checkpoint import (atomic_save, stored_test_record, file_sha256, read_threshold, threshold_path,
                                          write_threshold)
from glocalclip.model.checkpoint_format import GLOCAL_KEYS, adapt_checkpoint

from conftest import TINY_SIZE, randomise_prompts, tiny_config


def _original_layout(model: GlocalCLIP) -> dict:
    """The original code's file: contexts [1, 1, n, W], deep tokens, unused projections."""
    state = {}
    for k, v in model.prompt_learner.state_dict().items():
        state[k] = v.reshape(1, 1, *v.shape).clone() if k.startswith("ctx_") else v.clone()
    state["compound_prompt_projections.0.weight"] = torch.randn(896, v.shape[-1])
    return {"prompt_learner": state}


def _same_outputs(a: GlocalCLIP, b: GlocalCLIP) -> None:
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        oa, ob = a(x), b(x)
    torch.testing.assert_close(oa["anomaly_map"], ob["anomaly_map"], rtol=0, atol=0)
    torch.testing.assert_close(oa["image_score"], ob["image_score"], rtol=0, atol=0)


@pytest.fixture()
def source(tiny_clip):
    torch.manual_seed(0)
    return randomise_prompts(GlocalCLIP(tiny_config(), clip=tiny_clip), 11).eval()


def test_ours_loads_with_its_config_and_overrides_on_top(source, tiny_clip, tmp_path):
    path = tmp_path / "epoch_2.pth"
    atomic_save(source.checkpoint(2), path)
    ckpt = torch.load(path, weights_only=True)
    cfg, state = adapt_checkpoint(ckpt, {"image_score": "global+max"})
    assert cfg == source.cfg.replace(image_score="global+max")
    assert ckpt["config"]["image_score"] == "global"  # the checkpoint dict is left as it was
    assert set(state) == set(source.prompt_learner.state_dict())
    _same_outputs(source, load_model(path, clip=tiny_clip))
    _same_outputs(source, GlocalCLIP.from_checkpoint(path, clip=tiny_clip))


def test_the_original_glocal_layout_takes_its_shape_from_the_tensors(source, tiny_clip):
    old = _original_layout(source)
    cfg, state = adapt_checkpoint(old, {"backbone": "tiny", "image_size": TINY_SIZE})
    assert cfg == source.cfg  # the tiny backbone's own settings, the tensors' prompt shape
    assert all(state[k].ndim == 2 for k in GLOCAL_KEYS) and "compound_prompt_projections.0.weight" not in state
    _same_outputs(source, load_model(old, clip=tiny_clip, backbone="tiny", image_size=TINY_SIZE))
    with pytest.raises(ValueError, match="--n_ctx 6 but the checkpoint has 5"):
        adapt_checkpoint(old, {"backbone": "tiny", "n_ctx": 6})


def test_the_anomalyclip_layout_has_one_context_length(tiny_clip):
    torch.manual_seed(0)
    ref = randomise_prompts(GlocalCLIP(tiny_config(prompt_style="anomalyclip", n_ctx=4, ab_ctx=4), clip=tiny_clip),
                            5).eval()
    old = _original_layout(ref)
    cfg, _ = adapt_checkpoint(old, {"backbone": "tiny", "image_size": TINY_SIZE})
    assert (cfg.prompt_style, cfg.n_ctx, cfg.ab_ctx) == ("anomalyclip", 4, 4)
    assert adapt_checkpoint(old, {"backbone": "tiny", "ab_ctx": 9})[0].ab_ctx == 9  # no part in this layout
    _same_outputs(ref, load_model(old, clip=tiny_clip, backbone="tiny", image_size=TINY_SIZE))
    with pytest.raises(ValueError, match="--prompt_style glocal but the checkpoint has anomalyclip"):
        adapt_checkpoint(old, {"prompt_style": "glocal"})


# ---------------------------------------------------------------------------- the threshold sidecar
@pytest.fixture()
def checkpoint(source, tmp_path) -> Path:
    path = tmp_path / "epoch_1.pth"
    atomic_save(source.checkpoint(1), path)
    return path


def test_the_sidecar_holds_the_threshold_and_where_it_came_from(checkpoint):
    before = checkpoint.read_bytes()
    side = write_threshold(checkpoint, 0.625, dataset="mvtec", data_path="/d", sigma=8.0, image_size=518)
    assert side == threshold_path(checkpoint) == checkpoint.parent / "epoch_1.pth.threshold.json"
    assert checkpoint.read_bytes() == before
    record = json.loads(side.read_text())
    assert record == {"image_score": 0.625, "dataset": "mvtec", "data_path": "/d", "sigma": 8.0, "image_size": 518,
                      "derived": "F1-max",
                      "checkpoint": "epoch_1.pth", "checkpoint_sha256": file_sha256(checkpoint)}
    assert read_threshold(checkpoint) == record
    assert not list(checkpoint.parent.glob("*.tmp"))


def test_a_stale_or_broken_sidecar_is_ignored(checkpoint, source):
    write_threshold(checkpoint, 0.5, dataset=None, data_path="/d", sigma=8.0)
    atomic_save(source.checkpoint(2), checkpoint)  # the checkpoint changed since
    with pytest.warns(UserWarning, match="other contents of epoch_1.pth"):
        assert read_threshold(checkpoint) is None
    threshold_path(checkpoint).write_text("{not json")
    with pytest.warns(UserWarning, match="cannot be read"):
        assert read_threshold(checkpoint) is None
    threshold_path(checkpoint).unlink()
    assert read_threshold(checkpoint) is None


def test_a_failed_sidecar_write_leaves_nothing(checkpoint, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)  # how glocalclip.files writes every file
    with pytest.raises(OSError, match="(?i)no space left"):
        write_threshold(checkpoint, 0.5, sigma=8.0)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["epoch_1.pth"]


def checkpoint_threshold(path, ckpt):
    record = stored_test_record(path, ckpt)
    return None if record is None else record.threshold


def test_predict_takes_the_explicit_then_the_sidecar_then_the_embedded_threshold(source, tmp_path):
    path = tmp_path / "old.pth"
    atomic_save(source.checkpoint(1, threshold={"image_score": 0.7}), path)  # as older versions left it
    ckpt = torch.load(path, weights_only=True)
    assert checkpoint_threshold(path, ckpt) == 0.7
    write_threshold(path, 0.4, sigma=8.0)
    assert checkpoint_threshold(path, ckpt) == 0.4
    assert Predictor.from_checkpoint(path, device="cpu").threshold == 0.4
    assert Predictor.from_checkpoint(path, device="cpu", threshold=0.9).threshold == 0.9
    os.utime(path)  # touching does not make a sidecar stale; other bytes do
    assert checkpoint_threshold(path, ckpt) == 0.4
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.warns(UserWarning, match="other contents"):
        assert checkpoint_threshold(path, ckpt) == 0.7
    bare = tmp_path / "bare.pth"
    atomic_save(source.checkpoint(1), bare)
    assert checkpoint_threshold(bare, torch.load(bare, weights_only=True)) is None
