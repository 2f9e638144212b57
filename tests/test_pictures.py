"""Pictures say what they show: the test/demo grids label the ground truth as ground
truth and carry a legend; predict overlays label the prediction as a prediction, with the threshold
and the scores it was derived from; test.py prints the threshold with its origin."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glocalclip.inference import visualize
from glocalclip.datasets.synthetic import make_synthetic_dataset
from glocalclip.engine.checkpoint import threshold_source
from glocalclip.inference.evaluation import ClassScores


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), classes=("carpet",), n_train=1,
                                  n_test_good=3, n_test_defect=3, size=48, seed=2)


def _class_scores(data: Path) -> ClassScores:
    entries = json.loads((data / "meta.json").read_text())["test"]["carpet"]
    labels = np.array([e["anomaly"] for e in entries])
    masks = torch.zeros(len(entries), 32, 32, dtype=torch.uint8)
    masks[labels == 1, 8:16, 8:16] = 1
    maps = torch.rand(len(entries), 32, 32, generator=torch.Generator().manual_seed(0)) + masks * 0.5
    scores = np.linspace(0.9, 0.1, len(entries))  # the model's scores: not the labels
    return ClassScores("carpet", [str(data / e["img_path"]) for e in entries], labels, scores, maps, masks)


def test_a_test_grid_labels_the_ground_truth_as_ground_truth(data, monkeypatch):
    cs = _class_scores(data)
    written: list[list[str]] = []
    real = visualize.annotate
    monkeypatch.setattr(visualize, "annotate", lambda img, text, *a: written.append(list(text)) or real(img, text, *a))
    grid = visualize.class_grid(cs, k=2)
    by_score = {f"score {s:.3f}": int(l) for s, l in zip(cs.scores, cs.labels)}
    assert len(written) == 4  # two highest, two lowest
    for lines in written:
        assert lines[0] in by_score
        assert lines[1] == f"truth: {'anomalous' if by_score[lines[0]] else 'normal'}"
    legend = visualize.grid_legend((0.0, 1.5), has_masks=True)
    assert "truth = the ground-truth label" in legend and "green outline = the ground-truth defect mask" in legend
    assert "blue 0.00 .. red 1.50 for the whole class" in legend
    rows_only = 2 * (160 + 4 + 22) + 4
    assert grid.shape[0] >= rows_only + 2 * 16  # the legend, wrapped to the grid's width, underneath
    assert (grid[rows_only:] < 128).any()  # and drawn


def test_a_predict_caption_says_prediction_and_where_the_threshold_comes_from():
    source = threshold_source({"dataset": "mvtec", "data_path": "/data/mvtec", "sigma": 8.0})
    assert source == "best F1 on the test set of mvtec, σ 8"
    assert visualize.threshold_caption(0.4213, source) == "threshold 0.4213 (best F1 on the test set of mvtec, σ 8)"
    assert visualize.prediction_caption(0.61, 1, 0.4213, source) == [
        "predicted: anomalous", "score 0.610 >= threshold 0.4213", "threshold: best F1 on the test set of mvtec, sigma 8"]
    assert visualize.prediction_caption(0.2, 0, 0.4213, "given") == [
        "predicted: normal", "score 0.200 < threshold 0.4213", "threshold: given"]
    assert visualize.prediction_caption(0.2, None, None, None) == ["score 0.200", "no prediction: no threshold"]
    folder = threshold_source({"dataset": None, "data_path": "/photos/my_parts/", "sigma": 4})
    assert folder == "best F1 on the test set of my_parts, σ 4"


@pytest.mark.slow  # train.py and test.py
def test_test_py_prints_the_threshold_with_its_origin(data, tmp_path, capsys):
    from glocalclip.apps.cli import test_main, train_main

    from test_pipeline import TINY_FLAGS

    assert train_main(["--train_data_path", str(data), "--save_path", str(tmp_path / "ck"), "--epoch", "1",
                       "--num_workers", "0", "--no_progress", "--device", "cpu"] + TINY_FLAGS) == 0
    assert test_main(["--data_path", str(data), "--dataset", "mvtec", "--checkpoint_path",
                      str(tmp_path / "ck" / "epoch_1.pth"), "--save_path", str(tmp_path / "res"), "--sigma", "4",
                      "--num_workers", "0", "--no_progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("threshold "))
    assert line.endswith(f"(best F1 on the test set of mvtec, σ 4) for predict: {tmp_path / 'ck' / 'epoch_1.pth.threshold.json'}")


def test_the_grid_png_is_written_with_the_legend(data, tmp_path):
    visualize.save_class_visuals(tmp_path / "vis", _class_scores(data), k=2)
    with Image.open(tmp_path / "vis" / "carpet_grid.png") as grid:
        assert grid.height >= 2 * (160 + 4 + 22) + 4 + 2 * 16


def test_grid_pictures_show_a_16_bit_image_with_the_grey_levels_the_model_saw(tmp_path):
    """The test grids read pictures as predict and the model do: 16-bit grey scaled by its range,
    not clipped to white by PIL's RGB conversion."""
    from PIL import Image

    from glocalclip.inference.visualize import read_rgb

    grey = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "ct.png"
    Image.fromarray(grey).save(path)
    rgb = read_rgb(str(path))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(grey / 65535 * 255).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01


def test_the_colour_bar_runs_blue_to_red_and_says_its_ends():
    from glocalclip.inference import heatmap

    assert heatmap.jet(np.array([0.0, 1.0])).tolist() == [[0, 0, 128], [128, 0, 0]]  # dark blue .. dark red
    assert heatmap.jet(np.array(0.5)).tolist() == [128, 255, 128]  # the middle: green
    bar = heatmap.colour_bar(300, (0.0, 4.0))
    ramp = bar[3]  # a row through the colours
    blue, red = ramp[10].astype(int), ramp[-10].astype(int)
    assert blue[2] > 120 and blue[0] < 40 and red[0] > 120 and red[2] < 40
    assert (bar[bar.shape[0] // 2 + 4:] < 100).any()  # the ends written under the colours
    picture = np.full((90, 130, 3), 200, np.uint8)
    inset = heatmap.inset_colour_bar(picture, (0.0, 4.0))
    assert inset.shape == picture.shape  # an overlay keeps its image's size
    assert (inset[:45] == 200).all() and not (inset[-5:] == 200).all()  # the bar along the bottom edge only
    grid = heatmap.with_colour_bar(picture, (0.0, 1.0))
    assert grid.shape[0] > picture.shape[0] and (grid[:90] == picture).all()  # under a grid: appended


def test_a_class_grid_has_its_colour_bar_underneath(data):
    from glocalclip.inference.heatmap import colour_bar

    cs = _class_scores(data)
    grid = visualize.class_grid(cs, k=2)
    vr = (float(cs.maps.min()), float(cs.maps.max()))
    bar = colour_bar(grid.shape[1], vr, "anomaly map, one scale for the class")
    assert (grid[-bar.shape[0]:] == bar).all()
