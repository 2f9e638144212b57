"""Shared fixtures: a tiny random-weight CLIP (built once) and tiny GlocalCLIP configs."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

from glocalclip import GlocalCLIP, GlocalCLIPConfig  # noqa: E402
from glocalclip.model.backbone_record import BackboneRecord  # noqa: E402

def create_backbone(backbone: str, pretrained: str | None, trust: bool = False) -> torch.nn.Module:
    """The frozen CLIP as a model builds it (``BackboneRecord.build``): the architecture of ``backbone``,
    the weights of ``pretrained`` (None: the seeded random init, the same on every call)."""
    return BackboneRecord.resolve(backbone, pretrained).build(trust)


TINY_SIZE = 112  # 8×8 patch grid, not the tiny config's native 4×4: positional tables get resized


def tiny_config(**changes) -> GlocalCLIPConfig:
    """The tiny backbone with its preset layers and prompt lengths (no pretrained weights)."""
    return GlocalCLIPConfig.for_backbone(**{"backbone": "tiny", "image_size": TINY_SIZE, **changes})


def randomise_prompts(model: GlocalCLIP, seed: int) -> GlocalCLIP:
    """Give the prompt learner fresh N(0, 0.02²) values from ``seed`` (a model that is not the default init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.fixture(scope="session")
def tiny_clip():
    torch.manual_seed(1234)
    return create_backbone("tiny", None)


@pytest.fixture()
def tiny_model(tiny_clip):
    torch.manual_seed(0)
    return GlocalCLIP(tiny_config(), clip=tiny_clip)


# ---------------------------------------------------------------------------- deploy and serve
DEPLOY_SIGMA = 4.0
DEPLOY_THRESHOLD = 0.5
DEPLOY_IMAGE_SIZES = [(90, 130), (150, 70), (112, 112)]  # (h, w): non-square, one at the model's size


def save_deploy_checkpoint(path, cfg: GlocalCLIPConfig, seed: int = 0):
    """A checkpoint of ``cfg`` with random prompts (N(0, 0.02²) from ``seed``) as test.py leaves it:
    threshold and σ in the file beside it. The backbone's random init is seeded, so every rebuild is
    the same model."""
    from glocalclip.engine.checkpoint import write_threshold

    torch.manual_seed(seed)
    model = GlocalCLIP(cfg)
    torch.save(model.checkpoint(0), path)
    write_threshold(path, DEPLOY_THRESHOLD, sigma=DEPLOY_SIGMA)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return save_deploy_checkpoint(tmp_path_factory.mktemp("deploy") / "tiny.pth", tiny_config())


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory):
    """``tiny_checkpoint`` exported once per session (about 30 s on 2 busy cores)."""
    pytest.importorskip("onnxscript", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    pytest.importorskip("onnxruntime", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    from glocalclip.deploy.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_int8_onnx(tiny_checkpoint, tmp_path_factory):
    """``tiny_checkpoint`` exported with ``--int8`` (``export_onnx(int8=True)``), once per session."""
    pytest.importorskip("onnxscript", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    pytest.importorskip("onnxruntime", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    from glocalclip.deploy.export import export_onnx

    out = tmp_path_factory.mktemp("onnx_int8") / "tiny.int8.onnx"
    export_onnx(tiny_checkpoint, out, int8=True)
    return out


@pytest.fixture(scope="session")
def deploy_images(tmp_path_factory):
    """RGB PNGs with smooth structure and a bright blob, at DEPLOY_IMAGE_SIZES."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("deploy_images")
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate(DEPLOY_IMAGE_SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = 110 + 60 * np.sin(xx / (5 + i))[..., None] * np.array([1.0, 0.6, 0.3])
        base[(yy - h // 3) ** 2 + (xx - w // 2) ** 2 < (min(h, w) // 6) ** 2] = (250, 40, 40)
        img = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


# ---------------------------------------------------------------------------- predict's trained checkpoint
SIZES = [(90, 130), (150, 70), (64, 64), (121, 200)]  # (h, w): non-square, all different


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny checkpoint trained for one epoch on synthetic data, tested once (threshold stored).

    The tiny backbone's random weights are saved to a file and passed as ``--pretrained`` so every
    rebuild of the model has the same backbone (``--pretrained none`` draws new weights each time)."""
    from PIL import Image

    from glocalclip.apps import cli
    from glocalclip.datasets.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(1234)
    weights = root / "tiny_clip.pt"
    torch.save(create_backbone("tiny", None).state_dict(), weights)
    data = make_synthetic_dataset(root / "data", n_train=1, n_test_good=3, n_test_defect=3, size=64, seed=0)
    flags = ["--backbone", "tiny", "--pretrained", str(weights), "--image_size", "112",
             "--features_list", "2", "4", "6", "8", "--dpam", "6", "--n_ctx", "5", "--ab_ctx", "3",
             "--depth", "3", "--t_n_ctx", "2"]
    cli.train_main(["--train_data_path", str(data), "--save_path", str(root / "ckpt"), "--epoch", "1",
                "--batch_size", "8", "--num_workers", "0", "--device", "cpu", "--no_progress"] + flags)
    ckpt = root / "ckpt" / "epoch_1.pth"
    cli.test_main(["--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path", str(root / "results"),
               "--sigma", "4", "--num_workers", "0", "--device", "cpu", "--no_progress"])
    # a folder of inputs at their own (non-square) sizes, in two sub-folders, and a corrupt file
    inputs = root / "inputs"
    srcs = sorted((data / "grain" / "test").glob("*/*.png"))[:2] + sorted((data / "stripes" / "test").glob("*/*.png"))[:2]
    for i, (src, (h, w)) in enumerate(zip(srcs, SIZES)):
        d = inputs / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("RGB").resize((w, h)).save(d / f"img{i}.png")
    (inputs / "x.png").write_bytes(b"this is not an image \x00\x01\x02")
    return {"root": root, "weights": weights, "data": data, "ckpt": ckpt, "inputs": inputs,
            "model_flags": flags, "overrides": {"backbone": "tiny", "pretrained": str(weights), "image_size": 112,
                                                "features_list": (2, 4, 6, 8), "dpam_layer": 6}}


def good_inputs(trained) -> list[Path]:
    return sorted(p for p in trained["inputs"].rglob("*.png") if p.name != "x.png")


def sigint_as_ctrl_c() -> None:
    """``preexec_fn`` of a child that a test stops with SIGINT: Ctrl-C's default disposition. A job
    started in the background by a non-interactive shell (a CI runner, ``nohup ... &``) inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so the signal would be lost."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
