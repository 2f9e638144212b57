"""One checkpoint, tested with σ 4 (``test.py --sigma 4``, the ``trained`` fixture), gives the same
scores, maps and labels through every route: the Python API, ``predict --checkpoint``, ``predict
--model`` (its ONNX export), and ``serve`` with either backend; each says it smoothed with σ 4."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from glocalclip.engine.checkpoint import read_threshold
from glocalclip.inference.predictor import Predictor

from conftest import good_inputs

pytestmark = pytest.mark.slow

SCORE_TOL = 1e-5  # PyTorch (scipy's filter) against ONNX (float32 convolution)
MAP_TOL = 1e-4  # of the map's span


@pytest.fixture(scope="module")
def routes(trained, tmp_path_factory):
    """Every route's predictions for the same inputs: {route: {image path: (score, label, map_max, map or None)}}."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from fastapi.testclient import TestClient

    from glocalclip.apps import predict_cli
    from glocalclip.apps.backends import open_predictor
    from glocalclip.deploy.export import export_onnx
    from glocalclip.deploy.serve import ServeSettings, create_app
    from glocalclip.inference.settings import ModelSettings

    root = tmp_path_factory.mktemp("routes")
    inputs = [str(p) for p in good_inputs(trained)]
    onnx = root / "model.onnx"
    export_onnx(trained["ckpt"], onnx)  # σ and threshold: the checkpoint's record
    found: dict[str, dict[str, tuple]] = {}
    captions: dict[str, list[list[str]]] = {}
    sigmas: dict[str, float] = {}

    api = Predictor.from_checkpoint(trained["ckpt"], device="cpu", batch_size=2)  # every route: batches of 2
    sigmas["api"] = api.sigma
    found["api"] = {p.image_path: (p.pred_score, p.pred_label, p.map_max, p.anomaly_map) for p in api.predict(inputs)}

    for route, source in (("predict --checkpoint", ["--checkpoint", str(trained["ckpt"])]),
                          ("predict --model", ["--model", str(onnx)])):
        out = root / route.split("--")[1]
        said: list[list[str]] = []
        original = predict_cli.prediction_caption

        def spy(*args, **kwargs):
            said.append(original(*args, **kwargs))
            return said[-1]

        predict_cli.prediction_caption = spy
        try:
            assert predict_cli.predict_main([*inputs, *source, "--out", str(out), "--device", "cpu", "--batch_size",
                                             "2", "--no_progress"]) == 0
        finally:
            predict_cli.prediction_caption = original
        with open(out / "predictions.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        found[route] = {r["image_path"]: (float(r["pred_score"]), int(r["pred_label"]), float(r["map_max"]),
                                          np.load(r["anomaly_map"])) for r in rows}
        captions[route] = said

    for route, settings in (("serve pytorch", ModelSettings(checkpoint=str(trained["ckpt"]), device="cpu")),
                            ("serve onnxruntime", ModelSettings(model=str(onnx)))):
        predictor = open_predictor(settings, "serve")
        with TestClient(create_app(predictor, ServeSettings(max_batch=2))) as client:
            health = client.get("/healthz").json()
            body = client.post("/predict", files=[("files", (p, Path(p).read_bytes(), "image/png"))
                                                  for p in inputs]).json()
        assert health["backend"] == route.split()[1]
        sigmas[route] = health["sigma"]
        found[route] = {r["filename"]: (r["pred_score"], r["pred_label"], r["map_max"], None)
                        for r in body["results"]}
    return {"found": found, "captions": captions, "sigmas": sigmas, "inputs": inputs, "api": api}


def test_every_route_smooths_with_the_sigma_the_threshold_was_measured_with(trained, routes):
    assert read_threshold(trained["ckpt"])["sigma"] == 4.0
    assert routes["sigmas"] == {"api": 4.0, "serve pytorch": 4.0, "serve onnxruntime": 4.0}
    for route, said in routes["captions"].items():
        assert len(said) == len(routes["inputs"]), route
        for lines in said:
            assert lines[-1] == "map smoothed with sigma 4"
            assert lines[-2].startswith("threshold: best F1 on the test set of data, sigma 4"), lines


def test_every_route_gives_the_same_scores_maps_and_labels(trained, routes):
    want = routes["found"]["api"]
    threshold = read_threshold(trained["ckpt"])["image_score"]
    assert sorted(want) == sorted(routes["inputs"])
    labels = [w[1] for w in want.values()]
    assert labels == [int(w[0] >= threshold) for w in want.values()]
    for route, got in routes["found"].items():
        assert sorted(got) == sorted(want), route
        worst = {"score": max(abs(got[p][0] - want[p][0]) for p in want),
                 "map_max": max(abs(got[p][2] - want[p][2]) for p in want),
                 "map": max((float(np.abs(got[p][3] - want[p][3]).max()) for p in want if got[p][3] is not None),
                            default=None)}
        print(f"{route}: largest differences from the API {worst}")  # shown with pytest -s
        exact = route in ("predict --checkpoint", "serve pytorch")  # the same code on the same device
        for path, (score, label, peak, amap) in got.items():
            w_score, w_label, w_peak, w_map = want[path]
            span = float(w_map.max() - w_map.min())
            assert span > 1e-3
            if exact:
                assert (score, label, peak) == (w_score, w_label, w_peak), (route, path)
            else:
                assert abs(score - w_score) <= SCORE_TOL and abs(peak - w_peak) <= MAP_TOL * span, (route, path)
                assert label == w_label or abs(w_score - threshold) <= SCORE_TOL, (route, path)
            if amap is not None:
                assert amap.shape == w_map.shape
                assert float(np.abs(amap - w_map).max()) <= (0 if exact else MAP_TOL * span), (route, path)


def test_the_check_can_tell_the_papers_sigma_from_the_tested_one(trained, routes):
    """Smoothing with σ 8 instead (the old ``predict --checkpoint``) moves the maps far beyond the tolerance."""
    eight = Predictor.from_checkpoint(trained["ckpt"], device="cpu", sigma=8).predict(routes["inputs"])
    want = routes["found"]["api"]
    worst = max(float(np.abs(p.anomaly_map - want[p.image_path][3]).max() /
                      (want[p.image_path][3].max() - want[p.image_path][3].min())) for p in eight)
    print(f"σ 8 instead of the tested σ 4 moves the maps by up to {worst:.3f} of their span")
    assert worst > 100 * MAP_TOL


def test_a_threshold_measured_with_another_sigma_or_size_labels_nothing(trained):
    """The stored threshold belongs to the maps test.py measured it on (σ 4, the checkpoint's size):
    with σ 8 or another image size the route keeps no threshold, says why, and labels nothing unless
    one is given."""
    from glocalclip.engine.checkpoint import stored_test_record, threshold_for

    record = stored_test_record(trained["ckpt"], {})
    assert record is not None and record.sigma == 4.0
    size = record.image_size
    assert threshold_for(record, None, False, sigma=4.0, image_size=size) == (record.threshold, record.source)
    for sigma, image_size in ((8.0, size), (4.0, size * 2)):
        with pytest.warns(UserWarning, match="give a threshold"):
            threshold, source = threshold_for(record, None, False, sigma=sigma, image_size=image_size)
        assert threshold is None and source.startswith("none: the stored threshold was measured with σ 4.0")
    assert threshold_for(record, 0.5, False, sigma=8.0, image_size=size) == (0.5, "given")
    assert threshold_for(record, None, True, sigma=4.0, image_size=size)[0] is None  # few-shot scores
    with pytest.warns(UserWarning, match="give a threshold"):
        eight = Predictor.from_checkpoint(trained["ckpt"], device="cpu", sigma=8)
    assert eight.threshold is None and eight.sigma == 8.0
    assert Predictor.from_checkpoint(trained["ckpt"], device="cpu").threshold == record.threshold
