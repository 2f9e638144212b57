"""``test.py --shots K --shot_seed S`` (docs/design.md §11): the seeded draw from meta.json's train
split, what the results record, the zero-shot threshold left alone, the lift over zero-shot on
synthetic data the prompts never saw, the same shots on 2 gloo processes, and `report` grouping by K."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from glocalclip.apps import cli
from glocalclip.apps.report import build_report, load_run
from glocalclip.datasets import DatasetError, load_meta, write_meta
from glocalclip.datasets.synthetic import make_synthetic_dataset
from glocalclip.engine.checkpoint import threshold_path
from glocalclip.engine.few_shot import draw_shots

from test_pipeline import REPO


def _entries(cls_name, n, anomalous_every=0):
    return [{"img_path": f"{cls_name}/train/good/{i:03d}.png", "mask_path": "", "cls_name": cls_name,
             "specie_name": "good", "anomaly": int(anomalous_every and i % anomalous_every == 0)}
            for i in range(n)]


def test_draw_is_seeded_per_class_and_takes_only_normals():
    train = {"a": _entries("a", 10, anomalous_every=3), "b": _entries("b", 6)}
    one = draw_shots(train, ["a", "b"], 3, seed=7)
    assert one == draw_shots(train, ["b", "a"], 3, seed=7)  # class order does not matter
    assert one["b"] == draw_shots(train, ["b"], 3, seed=7)["b"]  # nor which other classes are tested
    assert one != draw_shots(train, ["a", "b"], 3, seed=8)
    normals_a = {e["img_path"] for e in train["a"] if e["anomaly"] == 0}
    assert len(set(one["a"])) == 3 and set(one["a"]) <= normals_a
    seen = {tuple(draw_shots(train, ["a"], 3, seed=s)["a"]) for s in range(20)}
    assert len(seen) > 10  # the seed really picks among the 6 normals


def test_a_class_without_train_normals_is_refused_by_name():
    train = {"a": _entries("a", 4), "b": _entries("b", 3, anomalous_every=1)}
    with pytest.raises(DatasetError, match=r"class\(es\) 'b' have none there.*--shots 0"):
        draw_shots(train, ["a", "b"], 2, seed=0, data_path="/data/x")
    with pytest.raises(DatasetError, match=r"--shots 5 needs 5 train normals per class; a \(4\)"):
        draw_shots(train, ["a"], 5, seed=0)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Synthetic data of another seed than the prompts were trained on, with 6 train normals per class."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("held_out"), n_train=6, n_test_good=4,
                                  n_test_defect=4, size=64, seed=1)


@pytest.fixture()
def ckpt(trained, tmp_path):
    """A private copy of the trained checkpoint: a zero-shot test.py rewrites the threshold beside it."""
    path = tmp_path / "ckpt" / "epoch_1.pth"
    path.parent.mkdir()
    shutil.copy(trained["ckpt"], path)
    return path


def _test(ckpt, data, out, *extra):
    cli.test_main(["--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path", str(out),
                   "--sigma", "4", "--num_workers", "0", "--device", "cpu", "--no_progress", *extra])
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_four_shots_lift_pixel_and_image_auroc_and_leave_the_zero_shot_threshold(ckpt, held_out, tmp_path):
    zero = _test(ckpt, held_out, tmp_path / "k0")
    side = threshold_path(ckpt)
    before = side.read_bytes()  # written by the zero-shot run
    four = _test(ckpt, held_out, tmp_path / "k4", "--shots", "4", "--shot_seed", "0")
    assert side.read_bytes() == before  # the few-shot threshold lives in its own results only
    assert zero["shots"] == 0 and zero["shot_paths"] is None
    assert four["shots"] == 4 and four["shot_seed"] == 0
    meta = load_meta(str(held_out))
    assert four["shot_paths"] == draw_shots(meta["train"], sorted(meta["train"]), 4, 0)
    assert all(len(p) == 4 for p in four["shot_paths"].values())
    md = (tmp_path / "k4" / "results.md").read_text()
    assert "shot seed: 0" in md and four["shot_paths"]["grain"][0] in md
    lift_pixel = four["mean"]["pixel_auroc"] - zero["mean"]["pixel_auroc"]
    lift_image = four["mean"]["image_auroc"] - zero["mean"]["image_auroc"]
    assert lift_pixel > 0 and lift_image > 0, (zero["mean"], four["mean"])
    # report: the zero-shot run and the few-shot run are two settings, told apart by K
    text = build_report([load_run(tmp_path / "k0" / "results.json"), load_run(tmp_path / "k4" / "results.json")])
    assert "shots=0" in text and "shots=4" in text and "/shot 0" in text


@pytest.mark.slow
def test_a_dataset_without_train_normals_is_refused_before_the_model_loads(trained, tmp_path):
    data = make_synthetic_dataset(tmp_path / "d", n_train=1, n_test_good=1, n_test_defect=1, size=32, seed=2)
    meta = json.loads((data / "meta.json").read_text())
    meta["train"] = {}
    write_meta(str(data), meta)
    rc = cli.run_command("test.py", cli.test_main, ["--data_path", str(data), "--checkpoint_path", "/nonexistent.pth",
                                                    "--save_path", str(tmp_path / "o"), "--shots", "2"])
    assert rc == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_two_gloo_processes_draw_the_same_shots(ckpt, held_out, tmp_path):
    one = _test(ckpt, held_out, tmp_path / "one", "--shots", "2", "--shot_seed", "5")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "test.py"), "--data_path", str(held_out), "--checkpoint_path", str(ckpt),
           "--save_path", str(tmp_path / "two"), "--sigma", "4", "--num_workers", "0", "--device", "cpu",
           "--no_progress", "--shots", "2", "--shot_seed", "5"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["shot_paths"] == one["shot_paths"]
    # each process scored half of every class against its own banks: equal metrics mean equal banks
    for k, v in one["mean"].items():
        assert two["mean"][k] == pytest.approx(v, abs=1e-6), k
