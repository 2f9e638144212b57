"""``--precision`` from the command line to the model that predict, serve and test build: the flag
becomes a model override, the loaded model's towers run in that dtype, and its scores stay within
bf16's rounding of the fp32 model's (docs/speed.md)."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_SIZE, randomise_prompts, tiny_config
from glocalclip import GlocalCLIP, load_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_clip):
    model = randomise_prompts(GlocalCLIP(tiny_config(), clip=tiny_clip), seed=4)
    path = tmp_path_factory.mktemp("precision") / "epoch_1.pth"
    torch.save(model.checkpoint(1), path)
    return path


@pytest.mark.parametrize("parser", ["test", "predict"])
def test_precision_flag_becomes_a_model_override(parser, checkpoint):
    from glocalclip.apps.cli import test_parser
    from glocalclip.apps.flags import model_overrides
    from glocalclip.apps.predict_cli import predict_parser

    make = {"test": test_parser, "predict": predict_parser}[parser]
    args = make().parse_args(["--checkpoint_path", str(checkpoint), "--precision", "bf16"]
                             + (["--data_path", "x"] if parser == "test" else ["x.png"]))
    assert model_overrides(args)["precision"] == "bf16"
    args = make().parse_args(["--checkpoint_path", str(checkpoint)] + (["--data_path", "x"] if parser == "test" else ["x.png"]))
    assert "precision" not in model_overrides(args)  # not given: the checkpoint's (fp32)


def test_loaded_model_runs_in_the_precision_asked_for(checkpoint):
    fp32 = load_model(checkpoint)
    bf16 = load_model(checkpoint, precision="bf16")
    assert fp32.compute_dtype == torch.float32 and bf16.compute_dtype == torch.bfloat16
    assert bf16.clip.visual.conv1.weight.dtype == torch.bfloat16
    assert bf16.clip.visual.ln_pre.weight.dtype == torch.float32
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    delta = (a["image_score"] - b["image_score"]).abs().max().item()
    assert 0 < delta < 0.02
    span = (a["anomaly_map"].max() - a["anomaly_map"].min()).item()
    assert 0 < (a["anomaly_map"] - b["anomaly_map"]).abs().max().item() < 0.05 * span


def test_serve_passes_precision_to_the_predictor(checkpoint):
    from glocalclip.apps.backends import open_predictor
    from glocalclip.inference.settings import ModelSettings

    pred = open_predictor(ModelSettings(checkpoint=str(checkpoint), precision="bf16", device="cpu", batch_size=2), "serve")
    assert pred.model.compute_dtype == torch.bfloat16
    pred = open_predictor(ModelSettings(checkpoint=str(checkpoint), device="cpu", batch_size=2), "serve")
    assert pred.model.compute_dtype == torch.float32
    with pytest.raises(ValueError, match=r"model settings \(precision\) set up a checkpoint's model"):
        open_predictor(ModelSettings(model="m.onnx", precision="bf16"), "serve")
