"""``--reference DIR|GLOB|BANK`` on predict, export and serve (docs/design.md §11): the bank built once
(or read back from its file), the zero-shot threshold not applied to few-shot scores, a reference image
scored against its own bank as zero-shot, and ONNX Runtime equal to PyTorch with the bank baked in."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import DEPLOY_SIGMA, DEPLOY_THRESHOLD
from glocalclip import Predictor


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Three defect-free surfaces like deploy_images' (same texture, no blob), at their own sizes."""
    folder = tmp_path_factory.mktemp("references")
    rng = np.random.default_rng(11)
    for i, (h, w) in enumerate([(100, 120), (112, 112), (140, 90)]):
        xx = np.mgrid[0:h, 0:w][1]
        base = 110 + 60 * np.sin(xx / (5 + i))[..., None] * np.array([1.0, 0.6, 0.3])
        Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)).save(
            folder / f"good{i}.png")
    return folder


def _few(checkpoint, reference, **kw):
    return Predictor.from_checkpoint(checkpoint, device="cpu", sigma=DEPLOY_SIGMA, batch_size=2,
                                     reference=str(reference), **kw)


def test_predict_with_a_reference_adds_the_term_and_drops_the_zero_shot_threshold(tiny_checkpoint, deploy_images,
                                                                                    references):
    zero = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", sigma=DEPLOY_SIGMA, batch_size=2)
    few = _few(tiny_checkpoint, references)
    assert zero.threshold == DEPLOY_THRESHOLD and few.threshold is None  # scores on another scale
    assert _few(tiny_checkpoint, references, threshold=0.7).threshold == 0.7  # one given explicitly stands
    images = [str(p) for p in deploy_images]
    for z, f in zip(zero.predict(images), few.predict(images)):
        added = f.anomaly_map - z.anomaly_map  # the smoothed, weighted few-shot map: >= 0 everywhere
        assert float(added.min()) > -1e-4 and float(added.max()) > 1e-2
        assert f.pred_score > z.pred_score
    # a reference image is its own nearest neighbour: the term vanishes, zero-shot scores remain
    own = str(sorted(references.glob("*.png"))[1])
    z, f = zero.predict(own), few.predict(own)
    assert abs(f.pred_score - z.pred_score) < 1e-4
    np.testing.assert_allclose(f.anomaly_map, z.anomaly_map, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_predict_cli_saves_the_bank_and_reuses_it(tiny_checkpoint, deploy_images, references, tmp_path):
    from glocalclip.apps.predict_cli import predict_main

    folder = str(deploy_images[0].parent)
    common = ["--checkpoint", str(tiny_checkpoint), folder, "--batch_size", "2", "--no_progress", "--device", "cpu",
              "--sigma", str(DEPLOY_SIGMA), "--no_overlays"]
    bank = tmp_path / "bank.pt"
    assert predict_main([*common, "--out", str(tmp_path / "a"), "--reference", str(references),
                         "--save_reference", str(bank)]) == 0
    assert bank.is_file()
    assert predict_main([*common, "--out", str(tmp_path / "b"), "--reference", str(bank)]) == 0
    rows = [[json.loads(line) for line in open(tmp_path / d / "predictions.jsonl")] for d in ("a", "b")]
    assert [r["pred_score"] for r in rows[0]] == [r["pred_score"] for r in rows[1]]
    assert all(r["pred_label"] is None for r in rows[0])  # no few-shot threshold was given


def test_a_saved_bank_with_some_few_shot_flags_given(tiny_checkpoint, deploy_images, references, tmp_path, capsys):
    """Flags that agree with the bank are taken (its own settings fill the rest); one that differs is
    refused, naming the flag, before any image is scored."""
    from glocalclip.apps.cli import run_command
    from glocalclip.apps.predict_cli import predict_main

    bank = tmp_path / "selected.pt"
    saved = _few(tiny_checkpoint, references, few_shot={"layers": "selected"}, save_reference=str(bank))
    assert saved.detector.bank.settings.layers == "selected" and bank.is_file()
    common = ["--checkpoint", str(tiny_checkpoint), str(deploy_images[0]), "--no_progress", "--device", "cpu",
              "--sigma", str(DEPLOY_SIGMA), "--no_overlays", "--reference", str(bank)]
    assert run_command("glocalclip predict", predict_main, [*common, "--out", str(tmp_path / "a"),
                                                            "--shot_weight", "16"]) == 0
    row = json.loads(open(tmp_path / "a" / "predictions.jsonl").readline())
    assert abs(row["pred_score"] - saved.predict(str(deploy_images[0])).pred_score) < 1e-5
    capsys.readouterr()
    assert run_command("glocalclip predict", predict_main, [*common, "--out", str(tmp_path / "b"),
                                                            "--shot_weight", "16", "--shot_layers", "blocks"]) == 2
    err = capsys.readouterr().err
    assert f"is a saved bank built with --shot_layers selected (not blocks): leave --shot_layers out" in err
    assert "--shot_weight" not in err and not (tmp_path / "b").exists()


def test_predict_replaces_a_saved_bank_only_when_asked(tiny_checkpoint, deploy_images, references, tmp_path, capsys):
    from glocalclip.apps.cli import run_command
    from glocalclip.apps.predict_cli import predict_main
    from glocalclip.model.few_shot import ReferenceBank

    bank = tmp_path / "good.pt"
    _few(tiny_checkpoint, references, few_shot={"weight": 2.0}, save_reference=str(bank))
    before = bank.read_bytes()
    common = ["--checkpoint", str(tiny_checkpoint), str(deploy_images[0]), "--no_progress", "--device", "cpu",
              "--no_overlays", "--reference", str(references), "--save_reference", str(bank)]
    assert run_command("glocalclip predict", predict_main, [*common, "--out", str(tmp_path / "a")]) == 2
    assert "exists and is kept: give another name, or --overwrite_reference" in capsys.readouterr().err
    assert bank.read_bytes() == before and not (tmp_path / "a").exists()
    assert run_command("glocalclip predict", predict_main, [*common, "--out", str(tmp_path / "b"),
                                                            "--overwrite_reference"]) == 0
    assert ReferenceBank.load(bank).settings.weight == 16.0  # the new bank, the default weight
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "good.pt"]  # no temp file left


@pytest.mark.slow
def test_export_bakes_the_bank_and_onnx_runtime_equals_pytorch(tiny_checkpoint, deploy_images, references, tmp_path):
    pytest.importorskip("onnxscript", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    pytest.importorskip("onnxruntime", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    from glocalclip.deploy import OnnxPredictor
    from glocalclip.deploy.export import export_onnx

    from test_deploy import assert_same_predictions

    out = tmp_path / "few.onnx"
    meta = export_onnx(tiny_checkpoint, out, reference=str(references))
    assert meta.threshold is None  # the checkpoint's zero-shot threshold does not fit few-shot scores
    assert meta.reference["images"] == 3 and meta.reference["settings"]["weight"] == 16.0
    (references / "good0.png").rename(references / "moved.png")  # the file is self-contained
    try:
        ort = OnnxPredictor(out, batch_size=2)
        assert ort.metadata.reference == meta.reference
        images = [str(p) for p in deploy_images]
        (references / "moved.png").rename(references / "good0.png")
        assert_same_predictions(ort.predict(images), _few(tiny_checkpoint, references).predict(images))
    finally:
        if (references / "moved.png").exists():
            (references / "moved.png").rename(references / "good0.png")


@pytest.mark.slow
def test_export_half_keeps_the_bank_float32(tiny_checkpoint, deploy_images, references, tmp_path):
    """--half rounds the weights, not the bank (its cosine products would move the few-shot map)."""
    onnx = pytest.importorskip("onnx", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    pytest.importorskip("onnxscript", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    from glocalclip.deploy import OnnxPredictor
    from glocalclip.deploy.export import export_onnx

    out = tmp_path / "half.onnx"
    meta = export_onnx(tiny_checkpoint, out, reference=str(references), half=True)
    few = _few(tiny_checkpoint, references)
    bank = few.detector.bank.bank()
    shape = sorted(bank.layers.tensors[0].shape)  # [rows, E], folded into the graph as [E, rows]
    assert meta.reference["rows"] in shape and len(bank.layers.tensors) == 4
    stored = onnx.load(str(out)).graph.initializer
    tables = [t for t in stored if sorted(t.dims) == shape]
    assert len(tables) == 4 and {t.data_type for t in tables} == {onnx.TensorProto.FLOAT}  # one per layer
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in stored) > 20  # the weights are rounded
    images = [str(p) for p in deploy_images]
    for h, w in zip(OnnxPredictor(out, batch_size=2).predict(images), few.predict(images)):
        span = float(w.anomaly_map.max() - w.anomaly_map.min())
        assert abs(h.pred_score - w.pred_score) < 1e-3 * span
        assert float(np.abs(h.anomaly_map - w.anomaly_map).max()) < 1e-3 * span


def test_serve_scores_with_the_reference(tiny_checkpoint, deploy_images, references):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from glocalclip.deploy.serve import create_app

    few = _few(tiny_checkpoint, references)
    with TestClient(create_app(few)) as client:
        body = client.post("/predict", files=[("files", (p.name, p.read_bytes(), "application/octet-stream"))
                                              for p in deploy_images]).json()
    want = few.predict([str(p) for p in deploy_images])
    assert [abs(r["pred_score"] - w.pred_score) < 1e-5 for r, w in zip(body["results"], want)] == [True] * 3


def test_an_int8_export_keeps_the_bank_float32_and_stays_close(tiny_checkpoint, deploy_images, references, tmp_path):
    """``export --int8 --reference``: only the blocks' matrices become int8 (the bank's products keep
    their float32 constants), and scores (relative to their size) and maps stay within export
    --int8's bounds (tests/test_export_int8.py) of the PyTorch few-shot predictor."""
    pytest.importorskip("onnxscript", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    onnx = pytest.importorskip("onnx", reason="the ONNX tests need the deploy extra: pip install -e '.[deploy]'")
    from glocalclip.deploy import OnnxPredictor
    from glocalclip.deploy.export import export_onnx

    from test_export_int8 import MAP_ERROR_OF_RANGE, SCORE_ERROR, TINY_BLOCKS

    out = tmp_path / "few.int8.onnx"
    export_onnx(tiny_checkpoint, out, reference=str(references), int8=True)
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("MatMulInteger") == 3 * TINY_BLOCKS
    ort = OnnxPredictor(out, batch_size=2)
    assert ort.weights == "int8" and ort.metadata.reference["images"] == 3
    images = [str(p) for p in deploy_images]
    for a, b in zip(ort.predict(images), _few(tiny_checkpoint, references).predict(images)):
        span = float(b.anomaly_map.max() - b.anomaly_map.min())
        assert abs(a.pred_score - b.pred_score) < SCORE_ERROR * max(1.0, abs(b.pred_score))  # few-shot scores reach ~5
        assert 0 < float(np.abs(a.anomaly_map - b.anomaly_map).max()) < MAP_ERROR_OF_RANGE * span
