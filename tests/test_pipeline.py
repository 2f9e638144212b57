"""train.py / test.py end to end on synthetic data, and the exactness claims of the fast paths:
resume == uninterrupted, cache == no cache, test batch 1 == batch N, 1 == 2 gloo processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glocalclip.apps.cli import test_main as run_test, train_main
from glocalclip.engine.checkpoint import read_threshold
from glocalclip.engine.loaders import default_num_workers
from glocalclip.datasets.synthetic import make_synthetic_dataset

from conftest import sigint_as_ctrl_c

pytestmark = pytest.mark.slow  # end to end: train.py / test.py runs, subprocesses

REPO = Path(__file__).resolve().parents[1]
TINY_FLAGS = ["--backbone", "tiny", "--pretrained", "none", "--image_size", "56", "--features_list", "2", "4",
              "6", "8", "--dpam", "6", "--n_ctx", "5", "--ab_ctx", "3", "--depth", "3", "--t_n_ctx", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, n_train=1, n_test_good=4, n_test_defect=4, size=64, seed=3)


def _train(data: Path, save: Path, *extra: str) -> Path:
    args = ["--train_data_path", str(data), "--save_path", str(save), "--epoch", "3", "--batch_size", "5",
            "--num_workers", "0", "--no_progress", "--device", "cpu"] + TINY_FLAGS + list(extra)
    assert train_main(args) == 0
    return save


def _prompts(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["prompt_learner"]


def _assert_same_prompts(a: Path, b: Path, atol: float) -> None:
    pa, pb = _prompts(a), _prompts(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=atol, msg=k)


def test_train_then_test_scripts_write_checkpoint_results_and_table(data, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(REPO / "train.py"), "--train_data_path", str(data), "--save_path",
                          str(tmp_path / "ck"), "--epoch", "2", "--batch_size", "4", "--num_workers", "1",
                          "--no_progress"] + TINY_FLAGS, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "epoch [2/2] loss" in run.stdout and "contrastive" in run.stdout
    ckpt_path = tmp_path / "ck" / "epoch_2.pth"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["config"]["n_ctx"] == 5 and ckpt["epoch"] == 2 and ckpt["optimizer"] is not None
    run = subprocess.run([sys.executable, str(REPO / "test.py"), "--data_path", str(data), "--checkpoint_path",
                          str(ckpt_path), "--save_path", str(tmp_path / "res"), "--batch_size", "3",
                          "--no_progress"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "pixel AUROC" in run.stdout and "mean" in run.stdout
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    keys = {"pixel_auroc", "pixel_aupro", "pixel_aupro_exact", "pixel_f1max", "image_auroc", "image_ap", "image_f1max"}
    assert set(res["mean"]) == keys
    assert set(res["classes"]) == {"checker", "grain", "stripes"}
    for m in res["classes"].values():
        assert all(0.0 <= m[k] <= 1.0 for k in keys)
    assert res["config"]["n_ctx"] == 5 and res["sigma"] == 8.0
    # no --num_workers given: chosen for the device; the run records what it used
    assert res["batch_size"] == 3 and res["num_workers"] == default_num_workers("cpu") and res["world_size"] == 1
    # wall times are the user's facts; where the time went is bench/'s business (tests/test_bench.py)
    assert 0 < res["wall_time_s"] < res["total_wall_time_s"]
    assert not any(k.endswith("_wait_s") or k == "startup_s" for k in res)
    md = (tmp_path / "res" / "results.md").read_text()
    assert "wall time, scoring and metrics" in md and "wall time, total" in md and "waiting" not in md
    csv_lines = (tmp_path / "res" / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("class,") and csv_lines[-1].startswith("mean,") and len(csv_lines) == 5
    # the F1-max threshold goes beside the checkpoint, which test.py leaves as it was
    assert read_threshold(ckpt_path)["image_score"] == res["image_threshold"]
    assert torch.load(ckpt_path, weights_only=True).keys() == ckpt.keys() and "threshold" not in ckpt


def test_resume_equals_uninterrupted(data, tmp_path):
    full = _train(data, tmp_path / "full")
    part = _train(data, tmp_path / "part", "--epoch", "1")
    assert not (part / "epoch_2.pth").exists()
    _train(data, part, "--resume", str(part))  # picks epoch_1.pth, continues to epoch 3
    _assert_same_prompts(full / "epoch_3.pth", part / "epoch_3.pth", atol=0)


def test_feature_cache_gives_the_same_prompts(data, tmp_path):
    cached = _train(data, tmp_path / "cached", "--feature_cache", "host")
    disk = _train(data, tmp_path / "disk", "--feature_cache", "disk")
    off = _train(data, tmp_path / "off", "--feature_cache", "off")
    _assert_same_prompts(cached / "epoch_3.pth", off / "epoch_3.pth", atol=1e-5)
    _assert_same_prompts(cached / "epoch_3.pth", disk / "epoch_3.pth", atol=0)
    log = (cached / "log.txt").read_text()
    assert "feature cache" in log and "host memory" in log


def test_test_batch_size_does_not_change_metrics(data, tmp_path):
    save = _train(data, tmp_path / "ck", "--epoch", "1")
    results = {}
    for bs in (1, 5):
        out = tmp_path / f"bs{bs}"
        assert run_test(["--data_path", str(data), "--checkpoint_path", str(save / "epoch_1.pth"), "--save_path",
                          str(out), "--batch_size", str(bs), "--num_workers", "0", "--no_progress",
                          "--device", "cpu"]) == 0
        results[bs] = json.loads((out / "results.json").read_text())
    for cls, m in results[1]["classes"].items():
        for k, v in m.items():
            assert abs(v - results[5]["classes"][cls][k]) <= 1e-4, (cls, k)


def test_two_gloo_processes_train_and_test_like_one(data, tmp_path):
    one = _train(data, tmp_path / "one", "--feature_cache", "off", "--batch_size", "23")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), "--train_data_path", str(data), "--save_path", str(tmp_path / "two"),
           "--epoch", "3", "--batch_size", "23", "--num_workers", "0", "--no_progress", "--device", "cpu",
           "--feature_cache", "off"] + TINY_FLAGS
    cached = cmd[:-len(TINY_FLAGS) - 2] + ["--feature_cache", "host"] + TINY_FLAGS
    cached[cached.index(str(tmp_path / "two"))] = str(tmp_path / "two_cached")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    # 24 images, batch 23: the last global batch has one image, so one rank gets none
    _assert_same_prompts(one / "epoch_3.pth", tmp_path / "two" / "epoch_3.pth", atol=1e-5)
    run = subprocess.run(cached, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    _assert_same_prompts(one / "epoch_3.pth", tmp_path / "two_cached" / "epoch_3.pth", atol=1e-5)

    ckpt = one / "epoch_3.pth"
    assert run_test(["--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path", str(tmp_path / "r1"),
                      "--num_workers", "0", "--no_progress", "--device", "cpu"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "test.py"), "--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path",
           str(tmp_path / "r2"), "--num_workers", "0", "--no_progress", "--device", "cpu", "--batch_size", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    r1 = json.loads((tmp_path / "r1" / "results.json").read_text())
    r2 = json.loads((tmp_path / "r2" / "results.json").read_text())
    assert r1["n_images"] == r2["n_images"] == 24
    for cls, m in r1["classes"].items():
        for k, v in m.items():
            assert abs(v - r2["classes"][cls][k]) <= 1e-4, (cls, k)


def test_bad_inputs_stop_with_messages(data, tmp_path, capsys):
    from glocalclip.datasets import DatasetError

    with pytest.raises(DatasetError, match="meta.json"):
        _train(tmp_path, tmp_path / "x")
    with pytest.raises(DatasetError, match="unknown dataset name"):
        _train(data, tmp_path / "x", "--dataset", "imagenet")
    with pytest.raises(ValueError, match="t_n_ctx"):
        _train(data, tmp_path / "x", "--t_n_ctx", "9")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        run_test(["--data_path", str(data), "--checkpoint_path", str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit):
        train_main(["--train_data_path", str(data), "--feature_cache", "gpu"])
    assert "invalid choice" in capsys.readouterr().err


def test_ctrl_c_keeps_last_checkpoint_and_resume_finishes_the_same(data, tmp_path):
    """SIGINT in the middle of training: exit 130, the finished epochs' checkpoints load, and
    --resume reaches the same final prompts as a run that was never stopped."""
    import signal
    import time

    save = tmp_path / "stopped"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(REPO / "train.py"), "--train_data_path", str(data), "--save_path", str(save),
           "--epoch", "400", "--batch_size", "5", "--num_workers", "0", "--no_progress", "--device", "cpu"] + TINY_FLAGS
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=sigint_as_ctrl_c)
    deadline = time.time() + 600  # bounds for a loaded machine: the start alone can take minutes there
    while not (save / "epoch_2.pth").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, out + err
    assert "interrupted" in out and "--resume" in out
    done = sorted(int(p.stem.split("_")[1]) for p in save.glob("epoch_*.pth"))
    assert done and done[-1] < 400 and not list(save.glob("*.tmp"))
    last = torch.load(save / f"epoch_{done[-1]}.pth", weights_only=True)
    assert last["epoch"] == done[-1]
    # resume to a few epochs past the stop and compare with an uninterrupted run
    target = str(done[-1] + 2)
    _train(data, save, "--resume", str(save), "--epoch", target)
    ref = _train(data, tmp_path / "ref", "--epoch", target)
    _assert_same_prompts(ref / f"epoch_{target}.pth", save / f"epoch_{target}.pth", atol=0)


def test_unmasked_anomalies_are_skipped_for_folder_data_and_zeroed_on_request(tmp_path):
    """Folder-mode data without masks: by default (auto) the local loss skips the anomalous images;
    --unmasked_anomalies zero trains them toward all-normal maps, as the original code did."""
    from PIL import Image

    from glocalclip.datasets import prepare_dataset
    from glocalclip.datasets.synthetic import make_sample

    import numpy as np

    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for sub, bad in (("good", False), ("bad", True)):
        (root / sub).mkdir(parents=True)
        for i in range(4):
            img, _ = make_sample("grain", 48, bad, rng)
            Image.fromarray(img).save(root / sub / f"{i}.png")
    prepare_dataset("folder", root, quiet=True, class_name="widget", normal="good", abnormal="bad")
    runs = {}
    for mode in ("auto", "skip", "zero"):
        runs[mode] = _train(root, tmp_path / mode, "--epoch", "1", "--unmasked_anomalies", mode)
    _assert_same_prompts(runs["auto"] / "epoch_1.pth", runs["skip"] / "epoch_1.pth", atol=0)
    with pytest.raises(AssertionError):
        _assert_same_prompts(runs["skip"] / "epoch_1.pth", runs["zero"] / "epoch_1.pth", atol=1e-6)


def test_evaluation_keeps_finished_classes_in_a_partial_file(data, tmp_path):
    from glocalclip import load_model
    from glocalclip.engine.distributed import DistContext
    from glocalclip.inference.evaluation import evaluate

    save = _train(data, tmp_path / "ck", "--epoch", "1")
    model = load_model(save / "epoch_1.pth")
    partial = tmp_path / "out" / "results.partial.json"
    res = evaluate(model, str(data), None, DistContext(), num_workers=0, progress=False, partial_path=partial,
                   classes=["grain", "stripes"])
    written = json.loads(partial.read_text())
    assert list(written["classes"]) == ["grain", "stripes"]
    assert written["classes"]["grain"]["pixel_auroc"] == pytest.approx(res["classes"]["grain"]["pixel_auroc"])
    out = tmp_path / "final"
    assert run_test(["--data_path", str(data), "--checkpoint_path", str(save / "epoch_1.pth"), "--save_path",
                     str(out), "--num_workers", "0", "--no_progress", "--classes", "grain"]) == 0
    assert (out / "results.json").is_file() and not (out / "results.partial.json").exists()


def test_scripts_report_input_errors_in_one_message_without_a_traceback(tmp_path):
    """A wrong data path fails before any weights load (train.py's default backbone is ViT-L with the
    'openai' weights, unreachable here), with the message naming the fix and exit code 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("GLOCALCLIP_TRACEBACK", None)
    train = subprocess.run([sys.executable, str(REPO / "train.py"), "--train_data_path", str(tmp_path / "nowhere"),
                            "--save_path", str(tmp_path / "ck")], capture_output=True, text=True, env=env, timeout=120)
    assert train.returncode == 2
    assert train.stderr.startswith(f"train.py: error: dataset root {tmp_path / 'nowhere'} does not exist")
    assert "Traceback" not in train.stderr
    cmd = [sys.executable, str(REPO / "test.py"), "--data_path", str(tmp_path / "nowhere"), "--checkpoint_path",
           str(tmp_path / "none.pth")]
    test = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert test.returncode == 2 and "Traceback" not in test.stderr and "check the data path" in test.stderr
    loud = subprocess.run(cmd, capture_output=True, text=True, env={**env, "GLOCALCLIP_TRACEBACK": "1"}, timeout=120)
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "DatasetError" in loud.stderr


def test_run_command_turns_only_input_errors_into_messages(capsys):
    from glocalclip.model.backbone import PretrainedWeightsUnavailable
    from glocalclip.apps.cli import run_command

    def failing(error):
        def command(argv):
            raise error
        return command

    for error in (ValueError("bad --x; use 2"), FileNotFoundError("no f"), PretrainedWeightsUnavailable("offline")):
        assert run_command("prog", failing(error), []) == 2
        assert capsys.readouterr().err.startswith(f"prog: error: {error} (GLOCALCLIP_TRACEBACK=1")  # one line
    assert run_command("prog", failing(KeyboardInterrupt()), []) == 130
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        run_command("prog", failing(RuntimeError("bug")), [])
    assert run_command("prog", lambda argv: None, []) == 0
    assert run_command("prog", lambda argv: 3, ["a"]) == 3


def test_tiny_backbone_needs_no_layer_flags_and_test_leaves_the_checkpoint_alone(data, tmp_path):
    """--backbone tiny brings its own layers, prompt lengths and random weights; test.py stores the
    F1-max threshold beside the checkpoint and never rewrites the checkpoint itself."""
    from glocalclip.engine.checkpoint import file_sha256
    from glocalclip.model.config import BACKBONE_DEFAULTS

    save = tmp_path / "ck"
    assert train_main(["--train_data_path", str(data), "--save_path", str(save), "--epoch", "1", "--num_workers",
                       "0", "--no_progress", "--device", "cpu", "--backbone", "tiny", "--image_size", "56"]) == 0
    ckpt = save / "epoch_1.pth"
    cfg = torch.load(ckpt, weights_only=True)["config"]
    preset = BACKBONE_DEFAULTS["tiny"]
    assert {k: cfg[k] for k in preset} == {**preset, "features_list": list(preset["features_list"])}
    sha, mtime = file_sha256(ckpt), ckpt.stat().st_mtime_ns
    out = tmp_path / "res"
    assert run_test(["--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path", str(out),
                     "--sigma", "4", "--num_workers", "0", "--no_progress", "--device", "cpu"]) == 0
    assert file_sha256(ckpt) == sha and ckpt.stat().st_mtime_ns == mtime
    res = json.loads((out / "results.json").read_text())
    side = read_threshold(ckpt)
    assert side["image_score"] == res["image_threshold"] is not None
    assert (side["dataset"], side["data_path"], side["sigma"]) == (None, str(data), 4.0)
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("epoch_1")) == \
        ["epoch_1.pth", "epoch_1.pth.threshold.json"]


def test_demo_runs_with_the_tiny_backbone_alone(tmp_path, capsys):
    from glocalclip.apps.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--image_size", "56", "--device", "cpu"]) == 0
    cfg = torch.load(out / "checkpoints" / "epoch_1.pth", weights_only=True)["config"]
    assert (cfg["backbone"], cfg["pretrained"], cfg["dpam_layer"], cfg["image_size"]) == ("tiny", None, 6, 56)
    assert (out / "results" / "results.json").is_file() and list((out / "results" / "vis").glob("*_grid.png"))
    assert "demo finished" in capsys.readouterr().out
