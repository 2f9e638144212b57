"""glocalclip export / OnnxPredictor / predict --model: the ONNX graph equals the PyTorch path.

Parity: ONNX Runtime vs the PyTorch Predictor (fp32, CPU) on the tiny config and bench/'s mid config,
each at two image sizes: scores within 1e-5, maps (at each image's own resolution) within 1e-4 of
their range. The runtime is checked torch-free in a fresh interpreter where torch cannot be imported.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import glocalclip
from glocalclip import GlocalCLIP, GlocalCLIPConfig, Predictor
from glocalclip.inference.images import read_image
from glocalclip.deploy.runtime import resize_bilinear

from conftest import DEPLOY_SIGMA, DEPLOY_THRESHOLD, save_deploy_checkpoint, tiny_config

REPO = Path(__file__).resolve().parents[1]
MID_CONFIG = dict(backbone=str(REPO / "bench" / "mid_clip.json"), pretrained=None, image_size=112,
                  features_list=(3, 6, 9, 12), dpam_layer=10, n_ctx=5, ab_ctx=3, depth=3, t_n_ctx=2)

onnxruntime = pytest.importorskip("onnxruntime", reason="needs the deploy extra: pip install -e '.[deploy]'")
onnx = pytest.importorskip("onnx", reason="needs the deploy extra: pip install -e '.[deploy]'")


def torch_predictor(checkpoint, image_size: int, sigma: float = DEPLOY_SIGMA) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, device="cpu", sigma=sigma, batch_size=2, image_size=image_size)


def assert_same_predictions(ort_preds, torch_preds) -> None:
    """Scores within 1e-5; maps, at the image's own size, within 1e-4 of the PyTorch map's range."""
    assert len(ort_preds) == len(torch_preds) > 0
    for o, t in zip(ort_preds, torch_preds):
        assert o.image_path == t.image_path
        assert abs(o.pred_score - t.pred_score) <= 1e-5
        assert o.anomaly_map.shape == t.anomaly_map.shape and o.anomaly_map.dtype == np.float32
        span = float(t.anomaly_map.max() - t.anomaly_map.min())
        assert span > 1e-3  # a flat map would make the comparison empty
        assert float(np.abs(o.anomaly_map - t.anomaly_map).max()) <= 1e-4 * span
        assert abs(o.map_max - t.map_max) <= 1e-4 * span


# ---------------------------------------------------------------------------- the graph, in torch
@pytest.mark.parametrize("image_score,sigma", [("global", 4.0), ("global+max", 8.0), ("global", 0.0)])
def test_deployed_detector_computes_what_predict_computes(image_score, sigma):
    """The module that gets exported (uint8 in, normalised, smoothed by convolution) against the
    Predictor (normalise_image, then scipy's gaussian_filter): no ONNX needed to check the maths."""
    from glocalclip.inference.detector import Detector

    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(image_score=image_score)).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    with torch.no_grad():
        score, amap = Detector(model, sigma, traceable=True)(torch.from_numpy(pixels))
    want = Predictor(model, sigma=sigma, device="cpu").predict_uint8(pixels, [(112, 112)] * 3)
    assert score.shape == (3,) and amap.shape == (3, 112, 112)
    np.testing.assert_allclose(score.numpy(), [p.pred_score for p in want], rtol=0, atol=1e-6)
    np.testing.assert_allclose(amap.numpy(), np.stack([p.anomaly_map for p in want]), rtol=0, atol=1e-5)
    if image_score == "global+max":  # the fused score uses the smoothed map's max
        assert np.all(score.numpy() > amap.numpy().reshape(3, -1).max(1))


def test_resize_matches_torch_bilinear():
    amap = np.random.default_rng(1).random((112, 112), dtype=np.float32) * 4
    for size in [(90, 130), (150, 70), (112, 112), (33, 500), (1, 1)]:
        want = F.interpolate(torch.from_numpy(amap)[None, None], size=size, mode="bilinear",
                             align_corners=False)[0, 0].numpy()
        got = resize_bilinear(amap, size)
        assert got.shape == size and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 weights rounded apart; a
        # half-pixel shift or a corner-aligned grid would be ~1e-1 off


# ---------------------------------------------------------------------------- parity through ONNX Runtime
@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory):
    return save_deploy_checkpoint(tmp_path_factory.mktemp("mid") / "mid.pth", GlocalCLIPConfig(**MID_CONFIG), seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("config,image_size", [("tiny", 112), ("tiny", 168), ("mid", 112), ("mid", 168)])
def test_onnx_runtime_equals_pytorch(config, image_size, request, tmp_path, deploy_images):
    from glocalclip.deploy import OnnxPredictor
    from glocalclip.deploy.export import export_onnx

    checkpoint = request.getfixturevalue("tiny_checkpoint" if config == "tiny" else "mid_checkpoint")
    if (config, image_size) == ("tiny", 112):
        path = request.getfixturevalue("tiny_onnx")  # the shared export, at the checkpoint's own size
    else:
        path = tmp_path / "model.onnx"
        export_onnx(checkpoint, path, image_size=image_size)
    ort = OnnxPredictor(path, batch_size=2)
    assert ort.image_size == image_size and ort.sigma == DEPLOY_SIGMA
    images = [str(p) for p in deploy_images]
    assert_same_predictions(ort.predict(images), torch_predictor(checkpoint, image_size).predict(images))


def test_batch_dimension_is_dynamic(tiny_onnx):
    """Exported with a batch of 2; batches of 1 and 3 run and give the same rows."""
    from glocalclip.deploy import OnnxPredictor

    pred = OnnxPredictor(tiny_onnx)
    assert isinstance(pred.session.get_inputs()[0].shape[0], str)  # symbolic, not 2
    pixels = np.random.default_rng(2).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    score3, map3 = pred.run(pixels)
    score1, map1 = pred.run(pixels[:1])
    assert score3.shape == (3,) and map3.shape == (3, 112, 112) and score1.shape == (1,)
    np.testing.assert_allclose(score1, score3[:1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(map1, map3[:1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 112, 112, 3\]"):
        pred.run(pixels[:, :56])


def test_metadata_and_contents_of_the_file(tiny_onnx, tiny_checkpoint):
    model = onnx.load(str(tiny_onnx))
    props = {p.key: p.value for p in model.metadata_props}
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    assert props["image_size"] == "112" and float(props["sigma"]) == DEPLOY_SIGMA  # σ test.py used
    assert float(props["threshold"]) == DEPLOY_THRESHOLD
    assert json.loads(props["config"]) == GlocalCLIPConfig.from_dict(ckpt["config"]).to_dict()
    assert props["glocalclip_version"] == glocalclip.__version__
    assert props["checkpoint_sha256"] == hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["pred_score", "anomaly_map"]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    assert not any(49408 in s for s in shapes)  # no token embedding: no text tower in the file
    assert (65, 128) in shapes and (17, 128) not in shapes  # positional table resized to 8x8+1, the 4x4+1 gone
    assert sum(s in ((2, 32), (32, 2)) for s in shapes) == 2  # global and local text features, constants
    assert str(REPO).encode() not in Path(tiny_onnx).read_bytes()  # no stack traces of the exporting machine


def test_a_file_not_from_glocalclip_export_is_refused(tmp_path):
    from glocalclip.deploy import OnnxPredictor

    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), tmp_path / "other.onnx")
    with pytest.raises(ValueError, match="glocalclip export"):
        OnnxPredictor(tmp_path / "other.onnx")
    with pytest.raises(FileNotFoundError, match="glocalclip export"):
        OnnxPredictor(tmp_path / "missing.onnx")


def test_half_rounds_weights_and_keeps_unit_vector_tables_float32(tmp_path):
    """A weight is stored float16; a table of unit rows (text features, a bank) or of unit columns (one
    folded into a transposed constant) stays float32, so its cosine products are the float32 graph's."""
    import onnx_ir as ir

    from glocalclip.deploy.half import is_unit_vector_table, store_weights_half

    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (64, 64)).astype(np.float32)
    columns = rng.normal(size=(64, 256)).astype(np.float32)
    columns /= np.linalg.norm(columns, axis=0, keepdims=True)  # a bank [E, M] as the export folds it
    rows = rng.normal(size=(32, 64)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    near = rows * np.float32(1 + 1e-3)  # 1e-3 off unit norm: a weight
    assert [is_unit_vector_table(a) for a in (weight, columns, rows, near, columns[:, :1, None])] == \
        [False, True, True, False, False]
    tables = {"weight": weight, "columns": columns, "rows": rows, "near": near}
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 64])
    x32 = onnx.helper.make_tensor_value_info("x32", onnx.TensorProto.FLOAT, [3, 32])
    outs = [onnx.helper.make_tensor_value_info(f"y_{n}", onnx.TensorProto.FLOAT, None) for n in tables]
    nodes = [onnx.helper.make_node("MatMul", ["x32" if n in ("rows", "near") else "x", n], [f"y_{n}"]) for n in tables]
    graph = onnx.helper.make_graph(nodes, "g", [x, x32], outs,
                                   [onnx.numpy_helper.from_array(a, n) for n, a in tables.items()])
    # IR version 10: what the oldest supported onnxruntime (1.20) reads; onnx 1.18+ would write 11
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10),
              tmp_path / "f.onnx")
    model = ir.load(str(tmp_path / "f.onnx"))
    assert store_weights_half(model) == 2  # weight and near
    ir.save(model, str(tmp_path / "h.onnx"))
    stored = {t.name: t.data_type for t in onnx.load(str(tmp_path / "h.onnx")).graph.initializer}
    assert stored == {"weight.float16": onnx.TensorProto.FLOAT16, "near.float16": onnx.TensorProto.FLOAT16,
                      "columns": onnx.TensorProto.FLOAT, "rows": onnx.TensorProto.FLOAT}
    feeds = {"x": rng.normal(size=(3, 64)).astype(np.float32), "x32": rng.normal(size=(3, 32)).astype(np.float32)}
    full, half = (onnxruntime.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feeds)
                  for f in ("f.onnx", "h.onnx"))
    for name, a, b in zip(tables, full, half):
        if name in ("columns", "rows"):
            np.testing.assert_array_equal(a, b)  # untouched
        else:
            assert 0 < float(np.abs(a - b).max()) < 1e-2 * float(np.abs(a).max())  # rounded, computed float32


@pytest.mark.slow
def test_export_cli_half_weights_and_external_data(tiny_checkpoint, tiny_onnx, deploy_images, tmp_path,
                                                   monkeypatch, capsys):
    """--half halves the file and still scores like the float32 file; weights past the protobuf limit
    (lowered here) go to OUT.data, which loads. --sigma overrides the checkpoint's σ."""
    from glocalclip.deploy import OnnxPredictor
    from glocalclip.apps.export_cli import export_main
    from glocalclip.deploy import export as export_module

    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", export_module.GRAPH_HEADROOM + 1)
    out = tmp_path / "half.onnx"
    assert export_main([str(tiny_checkpoint), "--out", str(out), "--half", "--sigma", "2"]) == 0
    assert "export: " in capsys.readouterr().out
    data = tmp_path / "half.onnx.data"
    assert data.is_file() and out.stat().st_size < 200_000  # the graph alone; the weights are beside it
    full_size = tiny_onnx.stat().st_size
    assert out.stat().st_size + data.stat().st_size < 0.65 * full_size
    model = onnx.load(str(out), load_external_data=False)
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) > 20 and all(len(t.dims) >= 2 for t in halves)
    half = OnnxPredictor(out)
    assert half.metadata.weights == "float16" and half.sigma == 2.0
    images = [str(p) for p in deploy_images]
    want = torch_predictor(tiny_checkpoint, 112, sigma=2.0).predict(images)
    for h, w in zip(half.predict(images), want):
        assert abs(h.pred_score - w.pred_score) < 1e-2
        span = float(w.anomaly_map.max() - w.anomaly_map.min())
        assert float(np.abs(h.anomaly_map - w.anomaly_map).max()) < 2e-2 * span


# ---------------------------------------------------------------------------- torch-free
NO_TORCH = """
import json, sys

class NoTorch:
    '''Stands for an environment without torch: importing it fails.'''
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("torch is not available in this test", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
import glocalclip
from glocalclip.deploy import OnnxPredictor
from glocalclip.apps.cli import main

assert glocalclip.OnnxPredictor is OnnxPredictor

preds = OnnxPredictor(sys.argv[1]).predict(sys.argv[3:])
assert main(["predict", "--model", sys.argv[1], *sys.argv[3:], "--out", sys.argv[2], "--no_progress"]) == 0
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert "torch" not in sys.modules, loaded
print(json.dumps([[p.pred_score, p.pred_label, list(p.anomaly_map.shape)] for p in preds]))
"""


def test_runtime_and_predict_model_run_without_torch(tiny_onnx, deploy_images, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    images = [str(p) for p in deploy_images]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, str(tiny_onnx), str(tmp_path / "out"), *images],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    from glocalclip.deploy import OnnxPredictor

    here = OnnxPredictor(tiny_onnx).predict(images)
    assert got == [[p.pred_score, p.pred_label, list(p.anomaly_map.shape)] for p in here]
    assert len(list((tmp_path / "out" / "maps").glob("*.npy"))) == len(images)


# ---------------------------------------------------------------------------- predict --model
def read_outputs(out: Path) -> tuple[list[str], list[dict], list[dict]]:
    with open(out / "predictions.csv") as f:
        header = next(csv.reader(f))
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    return header, rows, [json.loads(line) for line in open(out / "predictions.jsonl")]


def test_predict_model_writes_what_predict_checkpoint_writes(tiny_onnx, tiny_checkpoint, deploy_images, tmp_path,
                                                            capsys):
    from glocalclip.apps.predict_cli import predict_main

    folder = str(deploy_images[0].parent)
    common = [folder, "--batch_size", "2", "--no_progress"]
    assert predict_main(["--model", str(tiny_onnx), "--out", str(tmp_path / "onnx"), *common]) == 0
    assert predict_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "torch"), "--sigma",
                         str(DEPLOY_SIGMA), "--device", "cpu", *common]) == 0
    summaries = [line.split(" -> ")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("predict:")]
    assert len(summaries) == 2 and summaries[0] == summaries[1]  # same counts, same threshold
    h_onnx, r_onnx, j_onnx = read_outputs(tmp_path / "onnx")
    h_torch, r_torch, j_torch = read_outputs(tmp_path / "torch")
    assert h_onnx == h_torch and [list(j) for j in j_onnx] == [list(j) for j in j_torch]
    assert [r["image_path"] for r in r_onnx] == [r["image_path"] for r in r_torch] == [str(p) for p in deploy_images]
    for o, t, path in zip(j_onnx, j_torch, deploy_images):
        assert abs(o["pred_score"] - t["pred_score"]) <= 1e-5 and o["pred_label"] == t["pred_label"]
        m_onnx, m_torch = np.load(o["anomaly_map"]), np.load(t["anomaly_map"])
        w, h = Image.open(path).size
        assert m_onnx.shape == m_torch.shape == (h, w)
        assert float(np.abs(m_onnx - m_torch).max()) <= 1e-4 * float(m_torch.max() - m_torch.min())
        assert Image.open(o["overlay"]).size == Image.open(t["overlay"]).size == (w, h)


def test_predict_model_refuses_settings_the_file_fixes(tiny_onnx, deploy_images, tmp_path):
    from glocalclip.apps.predict_cli import predict_main

    args = ["--model", str(tiny_onnx), str(deploy_images[0]), "--out", str(tmp_path), "--no_progress"]
    with pytest.raises(ValueError, match="σ=4"):
        predict_main(args + ["--sigma", "8"])
    with pytest.raises(ValueError, match="n_ctx"):
        predict_main(args + ["--n_ctx", "7"])
    assert predict_main(args + ["--sigma", "4"]) == 0  # the file's own σ is fine


def test_runtime_reads_images_as_the_pytorch_path(tiny_onnx, deploy_images):
    """PIL images, arrays and paths give the same pixels (PIL bicubic), so the same scores."""
    from glocalclip.deploy import OnnxPredictor
    from glocalclip.datasets import load_image
    from glocalclip.datasets.preprocess import normalize_image

    pred = OnnxPredictor(tiny_onnx, threshold=0.0)
    path = deploy_images[0]
    pixels = read_image(str(path), 112).pixels
    torch_input = normalize_image(torch.from_numpy(pixels).permute(2, 0, 1).contiguous())
    assert torch.equal(torch_input, load_image(str(path), 112))  # exactly the training path's input
    by_path = pred.predict(str(path))
    rgb = Image.open(path).convert("RGB")
    assert pred.predict(rgb).pred_score == by_path.pred_score
    assert pred.predict(np.asarray(rgb)).pred_score == by_path.pred_score
    assert by_path.pred_label == 1  # threshold 0: every image is anomalous
    assert pred.predict(str(path), threshold=by_path.pred_score + 1e-3).pred_label == 0
