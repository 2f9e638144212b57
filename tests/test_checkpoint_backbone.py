"""Checkpoints (ours and the original code's) and backbone loading (docs/design.md §1, §2.1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from glocalclip import GlocalCLIP, GlocalCLIPConfig
from glocalclip.model.backbone import PretrainedWeightsUnavailable, build_clip, resolve_model_config
from glocalclip.engine.checkpoint import atomic_save, file_sha256

from conftest import TINY_SIZE, create_backbone, randomise_prompts, tiny_config


def test_checkpoint_round_trip_restores_config_and_scores(tiny_clip, tmp_path):
    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(ab_ctx=4), clip=tiny_clip)
    randomise_prompts(model, 5)
    opt = torch.optim.Adam(model.prompt_parameters(), lr=1e-3)
    path = tmp_path / "epoch_3.pth"
    atomic_save(model.checkpoint(epoch=3, optimizer=opt.state_dict()), path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["config"]["ab_ctx"] == 4 and "version" in ckpt
    assert "optimizer" in ckpt and set(ckpt["prompt_learner"]) == set(model.prompt_learner.state_dict())
    again = GlocalCLIP.from_checkpoint(path, clip=tiny_clip)
    assert again.cfg == model.cfg
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    a, b = model(x), again(x)
    torch.testing.assert_close(a["anomaly_map"], b["anomaly_map"], rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))


def _original_format_state(model: GlocalCLIP) -> dict:
    """What the original code saved: [1,1,n,W] contexts, deep tokens, unused projections, buffers."""
    pl = model.prompt_learner
    width = pl.ctx_global_pos.shape[1]
    state = {k: getattr(pl, k).detach().clone().reshape(1, 1, -1, width)
             for k in ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg")}
    for i, z in enumerate(pl.compound_prompts_text):
        state[f"compound_prompts_text.{i}"] = z.detach().clone()
        state[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, width)
        state[f"compound_prompt_projections.{i}.bias"] = torch.randn(896)
    state["token_prefix_pos"] = torch.randn(1, 1, 1, width)
    state["token_suffix_neg"] = torch.randn(1, 1, 60, width)
    state["tokenized_prompts"] = torch.zeros(4, 77, dtype=torch.long)
    return {"prompt_learner": state}


def test_original_format_checkpoint_loads(tiny_clip, tmp_path):
    torch.manual_seed(0)
    source = GlocalCLIP(tiny_config(), clip=tiny_clip)
    randomise_prompts(source, 9)
    path = tmp_path / "epoch_15.pth"
    torch.save(_original_format_state(source), path)
    torch.manual_seed(1)
    target = GlocalCLIP(tiny_config(), clip=tiny_clip)
    target.load_prompts(str(path))
    for k, v in source.prompt_learner.state_dict().items():
        assert torch.equal(v, target.prompt_learner.state_dict()[k]), k
    wrong = GlocalCLIP(tiny_config(n_ctx=6), clip=tiny_clip)
    with pytest.raises(ValueError, match="n_ctx: checkpoint 5 vs model 6"):
        wrong.load_prompts(str(path))
    with pytest.raises(ValueError, match="not a glocalclip checkpoint"):
        GlocalCLIP.from_checkpoint(path, clip=tiny_clip)


def test_config_refuses_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="unknown GlocalCLIPConfig fields"):
        GlocalCLIPConfig.from_dict({"n_ctx": 4, "bogus": 1})
    with pytest.raises(ValueError, match="multilayer"):
        GlocalCLIPConfig(multilayer="copy")
    assert GlocalCLIPConfig().features_list == (6, 12, 18, 24)


def test_plain_name_with_openai_weights_maps_to_quickgelu():
    cfg, name = resolve_model_config("ViT-L-14-336", "openai")
    assert name == "ViT-L-14-336-quickgelu" and cfg["quick_gelu"] is True
    cfg, name = resolve_model_config("ViT-L-14-336", None)
    assert name == "ViT-L-14-336" and not cfg.get("quick_gelu", False)
    cfg, _ = resolve_model_config("tiny", None)
    assert cfg["vision_cfg"]["width"] == 128 and cfg["vision_cfg"]["width"] // cfg["vision_cfg"]["head_width"] == 2


def test_json_config_path_and_random_init(tmp_path):
    cfg, _ = resolve_model_config("tiny", None)
    cfg["vision_cfg"]["layers"] = 3
    p = tmp_path / "three.json"
    p.write_text(json.dumps({"model_cfg": cfg}))
    model = create_backbone(str(p), None)
    assert len(model.visual.transformer.resblocks) == 3
    assert not any(q.requires_grad for q in model.parameters()) and not model.training
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_backbone(str(tmp_path / "missing.json"), None)
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("ViT-Q-99", None)


def test_local_state_dict_and_torchscript_archive_load(tmp_path, monkeypatch):
    """A state dict loads; a TorchScript archive loads when its SHA-256 is one OpenAI published (here the
    test archive's own, put in the table: test_safe_loading.py shows an unknown one refused)."""
    from glocalclip.model import backbone
    torch.manual_seed(7)
    src = create_backbone("tiny", None)
    sd_path = tmp_path / "tiny_state.pt"
    torch.save(src.state_dict(), sd_path)
    with pytest.warns(FutureWarning):
        scripted = torch.jit.script(src)
    ts_path = tmp_path / "tiny_openai_archive.pt"
    scripted.save(str(ts_path))
    with pytest.raises(Exception), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript archive")  # torch's hint, expected here
        torch.load(ts_path, weights_only=True)  # what open_clip would do
    published = backbone.published_openai_archives()
    assert published["3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"] == "ViT-L-14-336px.pt"
    monkeypatch.setattr(backbone, "published_openai_archives", lambda: {**published, file_sha256(ts_path): ts_path.name})
    cfg, _ = resolve_model_config("tiny", None)
    for path in (sd_path, ts_path):
        model = build_clip(cfg)
        from glocalclip.model.backbone import load_clip_weights, read_clip_state_dict
        load_clip_weights(model, read_clip_state_dict(path), str(path))
        for k, v in src.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (path.name, k)
    # through the public constructor too
    m = GlocalCLIP(tiny_config(pretrained=str(ts_path)))
    assert torch.equal(m.clip.visual.proj, src.visual.proj)
    bad = tmp_path / "wrong.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="do not fit the backbone"):
        create_backbone("tiny", str(bad))


@pytest.mark.slow  # a subprocess per case
@pytest.mark.parametrize("offline_env", ["0", "1"])
def test_openai_weights_offline_fail_fast_with_instructions(tmp_path, offline_env):
    """With an empty cache and no network (or HF_HUB_OFFLINE=1), asking for 'openai' fails
    within 10 s and says how to get the weights. The hub host is pointed at an unresolvable name
    so the test never downloads, even on a machine with network."""
    code = ("import time\nimport glocalclip.model.backbone as b\nfrom glocalclip.model.backbone_record import "
            "BackboneRecord\nb._HUB_HOST = 'hub.invalid'\nt=time.time()\n"
            "try:\n    BackboneRecord.resolve('ViT-L-14-336', 'openai').build()\nexcept Exception as e:\n"
            "    print(type(e).__name__, time.time()-t); print(e)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": offline_env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "PretrainedWeightsUnavailable" in out.stdout, out.stdout + out.stderr
    assert "--pretrained /path/to/ViT-L-14-336px.pt" in out.stdout
    assert "run once with network access" in out.stdout
    assert float(out.stdout.split()[1]) < 10


def test_random_init_is_the_same_every_time_and_leaves_the_rng_alone():
    torch.manual_seed(5)
    expected_next = torch.rand(1)
    torch.manual_seed(5)
    a = create_backbone("tiny", None)
    after = torch.rand(1)
    b = create_backbone("tiny", None)
    assert torch.equal(after, expected_next)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_quick_gelu_only_for_openai_weights():
    cfg, name = resolve_model_config("ViT-B-16", "laion2b_s34b_b88k")  # a non-OpenAI tag keeps GELU
    assert name == "ViT-B-16" and not cfg.get("quick_gelu", False)
    cfg, name = resolve_model_config("ViT-L/14@336px", "openai")     # OpenAI's spelling of the name
    assert name == "ViT-L-14-336-quickgelu" and cfg["quick_gelu"] is True
