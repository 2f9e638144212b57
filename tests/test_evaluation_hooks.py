"""evaluate()'s hooks: every moment is announced once, in order, on the thread that owns it; a class's
maps reach the hook when it asks for them; test.py --save_vis writes its pictures through them."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager

import pytest
import torch

from conftest import tiny_config
from glocalclip import GlocalCLIP
from glocalclip.datasets.synthetic import make_synthetic_dataset
from glocalclip.engine.distributed import DistContext
from glocalclip.inference.evaluation import evaluate
from glocalclip.inference.hooks import EvaluationHooks

CLASSES = ["checker", "grain", "stripes"]  # 7 test images each: 3 batches of at most 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("hooks"), n_train=1, n_test_good=3, n_test_defect=4,
                                  size=64, seed=5)


class Recorder(EvaluationHooks):
    """Writes down every call: (what, detail, the calling thread)."""

    def __init__(self, needs_maps: bool):
        self.needs_maps = needs_maps
        self.events: list[tuple] = []
        self.done: dict[str, tuple] = {}

    def run_started(self):
        self.events.append(("start", None, threading.get_ident()))

    @contextmanager
    def waiting(self, what):
        yield
        self.events.append(("wait", what, threading.get_ident()))

    def class_done(self, scores, metrics):
        self.events.append(("done", scores.cls_name, threading.get_ident()))
        self.done[scores.cls_name] = (None if scores.maps is None else tuple(scores.maps.shape), dict(metrics))

    def run_finished(self):
        self.events.append(("finish", None, threading.get_ident()))


@pytest.mark.parametrize("needs_maps", [False, True])
def test_hooks_hear_each_moment_once_in_order(data, tiny_clip, needs_maps):
    torch.manual_seed(3)
    model = GlocalCLIP(tiny_config(image_size=56), clip=tiny_clip)
    rec = Recorder(needs_maps)
    res = evaluate(model, str(data), None, DistContext(device=torch.device("cpu")), mode="image-level",
                   sigma=4, batch_size=3, num_workers=0, progress=False, hooks=rec)
    main = threading.get_ident()
    on_main = [(kind, what) for kind, what, thread in rec.events if thread == main]
    expected = [("start", None)]
    for i, _ in enumerate(CLASSES):
        expected += [("wait", "loader")] * 3 + [("wait", "device")] + ([("wait", "metrics")] if i else [])
    expected += [("wait", "metrics"), ("finish", None)]
    assert on_main == expected
    done = [(what, thread) for kind, what, thread in rec.events if kind == "done"]
    assert [c for c, _ in done] == CLASSES and all(t != main for _, t in done)  # on the metrics thread
    assert max(i for i, e in enumerate(rec.events) if e[0] == "done") < len(rec.events) - 1  # before finish
    # image-level metrics keep no maps unless the hook asks for them; it hears the results' numbers
    for cls_name in CLASSES:
        shape, metrics = rec.done[cls_name]
        assert shape == ((7, 56, 56) if needs_maps else None)
        assert metrics == res["classes"][cls_name] and set(metrics) == {"image_auroc", "image_ap", "image_f1max"}


@pytest.mark.slow  # test.py's main end to end
def test_save_vis_writes_each_class_grid_and_curves_through_test_main(data, tiny_clip, tmp_path):
    from PIL import Image

    from glocalclip.apps.cli import test_main

    torch.manual_seed(0)
    ckpt = tmp_path / "prompts.pth"
    torch.save(GlocalCLIP(tiny_config(image_size=56), clip=tiny_clip).checkpoint(1), ckpt)
    out = tmp_path / "res"
    assert test_main(["--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path", str(out),
                      "--metrics", "image-level", "--batch_size", "4", "--num_workers", "0", "--no_progress",
                      "--device", "cpu", "--save_vis"]) == 0
    for cls_name in CLASSES:
        with Image.open(out / "vis" / f"{cls_name}_grid.png") as grid:
            assert grid.width > 6 * 160 and grid.height > 2 * 160  # 6 highest and 6 lowest of 7 images
    curves = json.loads((out / "vis" / "curves.json").read_text())
    assert list(curves) == CLASSES
    # the maps were kept for the pictures although only image metrics were asked for
    assert all(set(c) == {"roc", "pro"} and 0 <= c["pro"]["aupro"] <= 1 for c in curves.values())
    results = json.loads((out / "results.json").read_text())
    assert {c: v["roc"]["auc"] for c, v in curves.items()} == pytest.approx(
        {c: m["image_auroc"] for c, m in results["classes"].items()}, abs=1e-12)
