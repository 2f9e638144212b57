"""train / test under injected I/O faults (ENOSPC, EROFS, EACCES, a file where a folder should be),
bad checkpoint files, a truncated latest checkpoint on --resume, leftovers of a SIGKILLed run, and
a corrupt image read by a loader worker: exit code 2, one message naming the path and the fix,
nothing half written left behind."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from glocalclip.apps.cli import run_command, test_main as run_test, train_main
from glocalclip.datasets.synthetic import make_synthetic_dataset

from test_pipeline import TINY_FLAGS


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three synthetic classes with two normal and two defective test images each."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=1, n_test_good=2, n_test_defect=2,
                                  size=48, seed=5)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (epoch_1..3.pth)."""
    save = tmp_path_factory.mktemp("reference")
    assert train_main(_train_args(data, save, "--epoch", "3")) == 0
    return save


def _train_args(data: Path, save: Path, *extra: str) -> list[str]:
    return ["--train_data_path", str(data), "--save_path", str(save), "--epoch", "1", "--batch_size", "4",
            "--num_workers", "0", "--no_progress", "--device", "cpu"] + TINY_FLAGS + list(extra)


def _test_args(data: Path, ckpt: Path, save: Path, *extra: str) -> list[str]:
    return ["--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path", str(save), "--num_workers", "0",
            "--no_progress", "--device", "cpu"] + list(extra)


def _error_line(capsys) -> str:
    """The one line run_command printed (ending in the traceback hint)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("(GLOCALCLIP_TRACEBACK=1 shows where it was raised)"), err
    return lines[0]


def _temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".tmp")]


def _fail_under(folder: Path, code: int, real):
    """os.open / os.mkdir that raise OSError(code) for paths under ``folder``."""
    def fake(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)
    return fake


@pytest.fixture()
def no_model(monkeypatch):
    """Building a model (train) or reading a checkpoint (test) fails the test: errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the save folder was checked")
    monkeypatch.setattr("glocalclip.engine.training.GlocalCLIP", refuse)
    monkeypatch.setattr("glocalclip.engine.checkpoint.load_model_and_checkpoint", refuse)


@pytest.mark.parametrize("fault", ["file_parent", "EROFS", "EACCES"])
def test_an_unwritable_save_folder_stops_train_and_test_before_the_model(data, tmp_path, monkeypatch, capsys,
                                                                         no_model, fault):
    save = tmp_path / "runs" / "a"
    if fault == "file_parent":
        (tmp_path / "runs").write_text("a file")
        says = f"{tmp_path / 'runs'} is a file, not a folder"
    else:
        code = getattr(errno, fault)
        monkeypatch.setattr(os, "open", _fail_under(save, code, os.open))
        says = {"EROFS": "read-only file system", "EACCES": "permission denied"}[fault]
    assert run_command("train.py", train_main, _train_args(data, save)) == 2
    line = _error_line(capsys)
    assert line.startswith("train.py: error: cannot write ") and str(save) in line and says in line
    assert run_command("test.py", run_test, _test_args(data, tmp_path / "x.pth", save)) == 2
    line = _error_line(capsys)
    assert str(save) in line and says in line
    if save.is_dir():
        assert list(save.iterdir()) == []


def test_a_disk_that_fills_during_training_is_one_message_and_no_temp(data, tmp_path, monkeypatch, capsys):
    real_write = os.write

    def full_disk(fd, payload):  # the one-byte probe of the save folder passes; the checkpoint does not
        if len(payload) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, payload)

    monkeypatch.setattr(os, "write", full_disk)
    save = tmp_path / "ck"
    assert run_command("train.py", train_main, _train_args(data, save)) == 2
    line = _error_line(capsys)
    assert str(save / "epoch_1.pth") in line and "no space left on the device" in line
    assert sorted(p.name for p in save.iterdir()) == ["log.txt"]


def test_save_vis_failing_is_an_error_not_a_silent_skip(data, reference, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "epoch_3.pth"
    shutil.copy(reference / "epoch_3.pth", ckpt)
    real_write = os.write

    def full_for_pictures(fd, payload):
        if bytes(payload[:4]) == b"\x89PNG":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, payload)

    monkeypatch.setattr(os, "write", full_for_pictures)
    monkeypatch.setattr(cv2, "imwrite", lambda *a, **k: False)  # what OpenCV reports on a full disk
    out = tmp_path / "res"
    assert run_command("test.py", run_test, _test_args(data, ckpt, out, "--save_vis", "--classes", "grain")) == 2
    line = _error_line(capsys)
    assert str(out / "vis" / "grain_grid.png") in line and "no space left" in line
    assert _temps(out) == []


def test_a_checkpoint_that_cannot_be_updated_still_gives_the_results(data, reference, tmp_path, monkeypatch, capsys):
    """test.py stores the image threshold beside the checkpoint; a read-only checkpoint folder is a
    note with the threshold to pass to predict, not a lost run."""
    ckpt = tmp_path / "ro" / "epoch_3.pth"
    ckpt.parent.mkdir()
    shutil.copy(reference / "epoch_3.pth", ckpt)
    monkeypatch.setattr(os, "open", _fail_under(ckpt.parent, errno.EROFS, os.open))
    out = tmp_path / "res"
    assert run_command("test.py", run_test, _test_args(data, ckpt, out)) == 0
    err = capsys.readouterr().err
    assert "note: the image threshold was not stored" in err and "read-only" in err and "--threshold " in err
    assert (out / "results.json").is_file() and "threshold" not in torch.load(ckpt, weights_only=True)


@pytest.mark.parametrize("kind, says", [
    ("random", "is not a PyTorch file"), ("empty", "is empty (0 bytes)"), ("folder", "is a folder"),
    ("truncated", "is truncated"), ("tensor", "holds a Tensor, not a checkpoint dict"),
])
def test_a_bad_checkpoint_says_what_the_file_is(data, reference, tmp_path, capsys, kind, says):
    bad = tmp_path / "bad.pth"
    good = (reference / "epoch_1.pth").read_bytes()
    if kind == "folder":
        bad.mkdir()
    else:
        content = {"random": os.urandom(4096), "empty": b"", "truncated": good[: len(good) // 2]}.get(kind)
        if content is None:
            torch.save(torch.zeros(3), bad)
        else:
            bad.write_bytes(content)
    assert run_command("test.py", run_test, _test_args(data, bad, tmp_path / "res")) == 2
    line = _error_line(capsys)
    assert f"checkpoint {bad} {says}" in line
    if kind != "truncated":
        assert "expected a checkpoint written by glocalclip" in line


def test_resume_passes_over_a_truncated_latest_checkpoint(data, reference, tmp_path):
    """epoch_2.pth cut in half: --resume DIR continues from epoch_1.pth, says so, and ends with the
    uninterrupted run's prompts."""
    save = tmp_path / "ck"
    save.mkdir()
    for n in (1, 2):
        shutil.copy(reference / f"epoch_{n}.pth", save)
    whole = (save / "epoch_2.pth").read_bytes()
    (save / "epoch_2.pth").write_bytes(whole[: len(whole) // 2])
    assert train_main(_train_args(data, save, "--epoch", "3", "--resume", str(save))) == 0
    log = (save / "log.txt").read_text()
    assert f"passing over a damaged checkpoint: checkpoint {save / 'epoch_2.pth'} is truncated" in log
    assert f"continuing from {save / 'epoch_1.pth'}" in log and "epochs 2..3" in log
    ref, got = (torch.load(p / "epoch_3.pth", weights_only=True)["prompt_learner"] for p in (reference, save))
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_a_sigkilled_runs_leftovers_go_at_the_next_start_in_the_folder(data, tmp_path):
    from test_files import killed_run_leftovers

    save = tmp_path / "ck"
    save.mkdir()
    left = killed_run_leftovers(save)
    assert any(n.startswith(".epoch_3.pth.") for n in left) and any(n.startswith("glocalclip_cache_") for n in left)
    assert train_main(_train_args(data, save, "--feature_cache", "disk")) == 0
    assert sorted(p.name for p in save.iterdir()) == ["epoch_1.pth", "log.txt", "train_history.json"]


def test_a_corrupt_image_read_by_a_worker_is_one_message(tmp_path, capsys):
    from PIL import Image

    from glocalclip.datasets import prepare_dataset

    root = tmp_path / "mine"
    rng = np.random.default_rng(0)
    for sub in ("good", "bad"):
        (root / sub).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / sub / f"{i}.png")
    broken = root / "bad" / "1.png"
    broken.write_bytes(broken.read_bytes()[:300])  # a PNG cut off inside its pixel data
    prepare_dataset("folder", root, quiet=True, class_name="widget", normal="good", abnormal="bad")
    args = _train_args(root, tmp_path / "ck")
    args[args.index("--num_workers") + 1] = "1"
    assert run_command("train.py", train_main, args) == 2
    line = _error_line(capsys)
    assert line.startswith(f"train.py: error: cannot decode image {broken}") and "truncated or corrupt" in line
    assert "worker" not in line


def test_a_named_dataset_on_your_own_data_says_to_omit_dataset(tmp_path):
    from PIL import Image

    from glocalclip.datasets import AnomalyDataset, DatasetError, prepare_dataset

    for sub in ("good", "bad"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (20, 20)).save(tmp_path / sub / "a.png")
    prepare_dataset("folder", tmp_path, quiet=True, class_name="widget", normal="good", abnormal="bad")
    with pytest.raises(DatasetError) as info:
        AnomalyDataset(tmp_path, dataset="mvtec")
    assert "omit --dataset for your own data" in str(info.value) and "or none" not in str(info.value)
