"""predict (CLI and API), convert, original-format checkpoints, and the visualisations."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glocalclip import GlocalCLIP, Predictor, load_model
from glocalclip.engine.checkpoint import read_threshold
from glocalclip.apps.convert import convert_main
from glocalclip.apps.predict_cli import predict_main
from glocalclip.datasets.synthetic import make_synthetic_dataset

from conftest import SIZES, create_backbone, good_inputs, tiny_config

pytestmark = pytest.mark.slow  # end to end: every test uses a checkpoint trained and tested by the CLI

ANOMALIB_FIELDS = ["image_path", "pred_score", "pred_label", "anomaly_map"]


def run_cli(trained, out: Path, capsys, *extra: str) -> tuple[int, str, str, list[dict]]:
    rc = predict_main(["--checkpoint", str(trained["ckpt"]), str(trained["inputs"]), "--out", str(out),
                       "--sigma", "4", "--batch_size", "3", "--device", "cpu", "--no_progress", *extra])
    cap = capsys.readouterr()
    rows = list(csv.DictReader(open(out / "predictions.csv"))) if (out / "predictions.csv").is_file() else []
    return rc, cap.out, cap.err, rows


def test_predict_cli_writes_every_output_and_skips_a_corrupt_file(trained, tmp_path, capsys):
    rc, out, err, rows = run_cli(trained, tmp_path / "out", capsys)
    assert rc == 0
    goods = good_inputs(trained)
    assert "x.png" in err and "skipped" in err  # reported by name
    assert sorted(r["image_path"] for r in rows) == sorted(map(str, goods))  # the rest still scored
    with open(tmp_path / "out" / "predictions.csv") as f:
        header = next(csv.reader(f))
    assert header[:4] == ANOMALIB_FIELDS
    thr = read_threshold(trained["ckpt"])["image_score"]
    jsonl = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert [j["image_path"] for j in jsonl] == [r["image_path"] for r in rows]
    n_anom = 0
    for r, j in zip(rows, jsonl):
        assert set(ANOMALIB_FIELDS) <= set(j)
        score = float(r["pred_score"])
        assert 0.0 <= score <= 1.0 and score == j["pred_score"]
        assert int(r["pred_label"]) == j["pred_label"] == int(score >= thr)  # the checkpoint's threshold
        n_anom += j["pred_label"]
        h, w = np.asarray(Image.open(r["image_path"])).shape[:2]
        amap = np.load(r["anomaly_map"])
        assert amap.shape == (h, w) and amap.dtype == np.float32
        assert float(r["map_max"]) == pytest.approx(j["map_max"]) and j["map_max"] > 0
        assert Image.open(j["overlay"]).size == (w, h)
    summary = [line for line in out.splitlines() if line.startswith("predict:")]
    assert summary == [f"predict: {len(goods)} scored, {n_anom} anomalous (threshold {thr:.4g}), 1 skipped "
                       f"-> {tmp_path / 'out' / 'predictions.csv'}"]


def test_api_and_cli_give_identical_scores_and_maps_at_input_resolution(trained, tmp_path, capsys):
    _, _, _, rows = run_cli(trained, tmp_path / "out", capsys, "--threshold", "0.5")
    cli = {r["image_path"]: r for r in rows}
    pred = Predictor.from_checkpoint(trained["ckpt"], device="cpu", sigma=4, batch_size=3)  # as the CLI call
    goods = good_inputs(trained)
    api = pred.predict([str(p) for p in goods], threshold=0.5)
    assert len(api) == len(goods)
    pred.batch_size = 2  # other batches: the same up to float rounding
    assert [a.pred_score for a in pred.predict([str(p) for p in goods])] == \
        pytest.approx([a.pred_score for a in api], abs=1e-6)
    sizes = set()
    for p, a in zip(goods, api):
        c = cli[str(p)]
        assert a.pred_score == float(c["pred_score"])  # exact: same code path, repr-round-tripped floats
        assert a.pred_label == int(c["pred_label"]) == int(a.pred_score >= 0.5)
        np.testing.assert_array_equal(a.anomaly_map, np.load(c["anomaly_map"]))
        img = Image.open(p)
        assert a.anomaly_map.shape == (img.height, img.width)
        sizes.add(a.anomaly_map.shape)
        # PIL images and arrays are the same images: same scores
        one = pred.predict(img.convert("RGB"))
        arr = pred.predict(np.asarray(img.convert("RGB")))
        assert one.pred_score == pytest.approx(a.pred_score, abs=1e-6)
        assert arr.pred_score == pytest.approx(a.pred_score, abs=1e-6)
        assert arr.anomaly_map.shape == a.anomaly_map.shape
    assert sizes == {(h, w) for h, w in SIZES}
    # the map is the smoothed map resized: its max is close to the model-resolution max
    assert all(abs(a.anomaly_map.max() - a.map_max) < 0.05 * a.map_max for a in api)


def test_labels_follow_explicit_then_stored_then_no_threshold(trained):
    pred = Predictor.from_checkpoint(trained["ckpt"], device="cpu", sigma=4)
    stored = read_threshold(trained["ckpt"])["image_score"]
    assert pred.threshold == pytest.approx(stored)
    img = str(good_inputs(trained)[0])
    s = pred.predict(img).pred_score
    assert pred.predict(img, threshold=s + 1e-3).pred_label == 0
    assert pred.predict(img, threshold=s).pred_label == 1
    bare = Predictor(pred.model, threshold=None, sigma=4, device="cpu")
    assert bare.predict(img).pred_label is None


def test_corrupt_input_raises_in_the_api(trained):
    from glocalclip.datasets import DatasetError

    pred = Predictor.from_checkpoint(trained["ckpt"], device="cpu")
    with pytest.raises(DatasetError, match="x.png"):
        pred.predict([str(trained["inputs"] / "x.png")])


def test_predict_with_no_inputs_says_so(trained, tmp_path, capsys):
    rc = predict_main(["--checkpoint", str(trained["ckpt"]), str(tmp_path / "nothing_here"), "--out",
                       str(tmp_path / "o"), "--no_progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing_here" in err and "no images" in err


def original_format(state: dict[str, torch.Tensor], keys: tuple[str, ...], width: int) -> dict:
    """What the original code saved: contexts [1, 1, n, W], deep tokens, unused projections, buffers."""
    pl = {}
    for k, v in state.items():
        pl[k] = v.reshape(1, 1, *v.shape) if k in keys else v.clone()
    n_deep = sum(k.startswith("compound_prompts_text.") for k in state)
    for i in range(n_deep):
        pl[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, width)
        pl[f"compound_prompt_projections.{i}.bias"] = torch.randn(896)
    pl["token_prefix_pos"] = torch.randn(1, 1, width)
    pl["tokenized_prompts"] = torch.randint(0, 100, (2, 77))
    return {"prompt_learner": pl}


def test_converted_original_checkpoint_scores_identically(trained, tmp_path, capsys):
    ours = torch.load(trained["ckpt"], weights_only=True)
    keys = ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg")
    old = tmp_path / "old.pth"
    torch.save(original_format(ours["prompt_learner"], keys, 128), old)
    flags = trained["model_flags"][:13]  # backbone, pretrained, image_size, features_list, dpam: not in the tensors
    assert convert_main([str(old), str(tmp_path / "new.pt")] + flags) == 0
    out = capsys.readouterr().out
    assert "n_ctx 5" in out and "compound_prompt_projections.*.weight (2)" in out
    new = torch.load(tmp_path / "new.pt", weights_only=True)
    assert new["format"] == "glocalclip"
    assert {k: new["config"][k] for k in ("n_ctx", "ab_ctx", "depth", "t_n_ctx", "dpam_layer", "prompt_style")} == \
        {"n_ctx": 5, "ab_ctx": 3, "depth": 3, "t_n_ctx": 2, "dpam_layer": 6, "prompt_style": "glocal"}
    assert not any("projection" in k or "token_prefix" in k for k in new["prompt_learner"])

    images = [str(p) for p in good_inputs(trained)]
    direct = Predictor.from_checkpoint(old, device="cpu", sigma=4, **trained["overrides"]).predict(images)
    converted = Predictor.from_checkpoint(tmp_path / "new.pt", device="cpu", sigma=4).predict(images)
    source = Predictor.from_checkpoint(trained["ckpt"], device="cpu", sigma=4).predict(images)
    for d, c, s in zip(direct, converted, source):
        assert d.pred_score == c.pred_score == s.pred_score
        np.testing.assert_array_equal(d.anomaly_map, c.anomaly_map)

    # a flag that contradicts the tensors is refused by name
    assert convert_main([str(old), str(tmp_path / "bad.pt"), "--n_ctx", "7"] + flags) == 2
    assert "--n_ctx 7 but the checkpoint has 5" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_anomalyclip_checkpoint_loads_with_its_prompt_layout_and_scores(trained, tmp_path, capsys):
    clip = create_backbone("tiny", str(trained["weights"]))
    torch.manual_seed(7)
    cfg = tiny_config(pretrained=str(trained["weights"]), prompt_style="anomalyclip", n_ctx=4, ab_ctx=4,
                      depth=3, t_n_ctx=2)
    ref = GlocalCLIP(cfg, clip=clip).eval()
    state = {k: v.detach().clone() for k, v in ref.prompt_learner.state_dict().items()}
    assert set(k for k in state if k.startswith("ctx")) == {"ctx_pos", "ctx_neg"}
    old = tmp_path / "anomalyclip.pth"
    torch.save(original_format(state, ("ctx_pos", "ctx_neg"), 128), old)

    # the layout is inferred from the tensor names; the rest of the config from the overrides
    model = load_model(old, **trained["overrides"])
    assert model.cfg.prompt_style == "anomalyclip" and model.cfg.n_ctx == 4
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want, got = ref(x), model.eval()(x)
    torch.testing.assert_close(got["image_score"], want["image_score"], rtol=0, atol=0)
    torch.testing.assert_close(got["anomaly_map"], want["anomaly_map"], rtol=0, atol=0)
    g, l = model.encode_text()
    assert torch.equal(g, l)  # one pair serves the image score and the map

    images = [str(p) for p in good_inputs(trained)]
    preds = Predictor.from_checkpoint(old, device="cpu", sigma=4, prompt_style="anomalyclip",
                                      **trained["overrides"]).predict(images)
    assert all(0 <= p.pred_score <= 1 and np.isfinite(p.anomaly_map).all() for p in preds)
    assert convert_main([str(old), str(tmp_path / "ac.pt"), "--prompt_style", "anomalyclip"]
                        + trained["model_flags"][:13]) == 0
    conv = Predictor.from_checkpoint(tmp_path / "ac.pt", device="cpu", sigma=4).predict(images)
    assert [p.pred_score for p in conv] == [p.pred_score for p in preds]
    assert torch.load(tmp_path / "ac.pt", weights_only=True)["config"]["prompt_style"] == "anomalyclip"
    assert convert_main([str(old), str(tmp_path / "g.pt"), "--prompt_style", "glocal"]) == 2


def _class_scores(trained):
    from glocalclip.inference.evaluation import ClassScores

    entries = json.loads((trained["data"] / "meta.json").read_text())["test"]["grain"]
    n = len(entries)
    rng = np.random.default_rng(0)
    masks = torch.zeros(n, 32, 32, dtype=torch.uint8)
    masks[np.array([e["anomaly"] for e in entries]) == 1, 8:16, 8:16] = 1
    maps = torch.rand(n, 32, 32, generator=torch.Generator().manual_seed(0)) + masks * 0.5
    return ClassScores("grain", [str(trained["data"] / e["img_path"]) for e in entries],
                       np.array([e["anomaly"] for e in entries]), rng.random(n), maps, masks)


def test_save_vis_writes_a_grid_and_curves_without_matplotlib(trained, tmp_path):
    from glocalclip.inference.visualize import save_class_visuals

    cs = _class_scores(trained)
    written = save_class_visuals(tmp_path / "vis", cs, k=2)
    grid = Image.open(tmp_path / "vis" / "grain_grid.png")
    assert grid.width > 2 * 160 and grid.height > 2 * 160  # two rows of two tiles
    curves = json.loads((tmp_path / "vis" / "curves.json").read_text())["grain"]
    assert curves["roc"]["fpr"][0] == 0.0 and curves["roc"]["tpr"][-1] == 1.0
    assert 0 <= curves["pro"]["aupro"] <= 1 and len(curves["pro"]["fpr"]) == len(curves["pro"]["pro"])
    assert len([p for p in written if p.suffix == ".png"]) <= 3  # a grid (and plots), not one file per image
    # importing the module must not need matplotlib
    code = "import sys, glocalclip.inference.visualize, glocalclip.inference.predictor; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_curves_writes_roc_and_pro(trained, tmp_path):
    pytest.importorskip("matplotlib")
    from glocalclip.inference.visualize import class_curves, plot_curves

    paths = plot_curves({"grain": class_curves(_class_scores(trained))}, tmp_path)
    assert [p.name for p in paths] == ["roc.png", "pro.png"]
    assert all(Image.open(p).width > 100 for p in paths)


def test_predictions_are_the_protocols_smoothed_map_and_global_score(trained):
    """What predict returns for a batch is what test.py measures: the model's global image score and
    its map smoothed by scipy's gaussian_filter(σ), at the model's resolution when asked for it."""
    from scipy.ndimage import gaussian_filter

    preds = {v: Predictor.from_checkpoint(trained["ckpt"], device="cpu", sigma=v) for v in (4.0, 8.0)}
    pred = preds[4.0]
    s = pred.image_size
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pred.model(x)
    for sigma in (4.0, 8.0):
        got = preds[sigma].predict_tensors(x, [(s, s)] * 2)
        for i, p in enumerate(got):
            expected = gaussian_filter(out["anomaly_map"][i].numpy(), sigma=sigma)
            np.testing.assert_allclose(p.anomaly_map, expected, rtol=0, atol=1e-6)
            assert p.pred_score == pytest.approx(float(out["image_score"][i]), abs=1e-6)
            assert p.map_max == pytest.approx(float(expected.max()), abs=1e-6)
    four, eight = (preds[v].predict_tensors(x, [(s, s)] * 2)[0].anomaly_map for v in (4.0, 8.0))
    assert np.abs(four - eight).max() > 1e-4  # the two σ give different maps: the check above can tell
