"""Runs never mix, and checkpoints are self-contained (docs/design.md §2.1, §5).

- train.py into a folder of an earlier run refuses (exit 2, one message naming --resume DIR and
  --overwrite); --overwrite clears the earlier run first;
- --resume takes the checkpoint's settings where no flag gives them, refuses flags that contradict
  it, applies a new --learning_rate to the optimizer and records it;
- a checkpoint trained with --backbone some/config.json rebuilds without the JSON, and scores the
  same after the JSON is edited; the weights' SHA-256 is recorded and a different file warned about.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from glocalclip.apps.cli import run_command, train_main
from glocalclip.datasets.synthetic import make_synthetic_dataset
from glocalclip.engine.checkpoint import file_sha256, load_model, threshold_path
from glocalclip.model.backbone import resolve_model_config

from conftest import create_backbone
from test_io_errors import _error_line
from test_pipeline import TINY_FLAGS

pytestmark = pytest.mark.slow  # train.py runs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=1, n_test_good=2, n_test_defect=2,
                                  size=48, seed=5)


def _args(data: Path, save: Path, *extra: str, model: list[str] = TINY_FLAGS) -> list[str]:
    return ["--train_data_path", str(data), "--save_path", str(save), "--epoch", "1", "--batch_size", "4",
            "--num_workers", "0", "--no_progress", "--device", "cpu"] + list(model) + list(extra)


@pytest.fixture(scope="module")
def three_epochs(data, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (read only: tests copy it)."""
    save = tmp_path_factory.mktemp("three")
    assert train_main(_args(data, save, "--epoch", "3")) == 0
    return save


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _ckpt(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------- one folder, one run
def test_train_into_a_folder_of_an_earlier_run_refuses_and_changes_nothing(data, three_epochs, tmp_path, capsys):
    save = _copy(three_epochs, tmp_path / "run")
    before = _snapshot(save)
    assert run_command("train.py", train_main, _args(data, save)) == 2
    line = _error_line(capsys)
    assert f"--save_path {save} holds the checkpoints of an earlier run (epoch_1.pth .. epoch_3.pth" in line
    assert f"--resume {save}" in line and "--overwrite" in line
    assert _snapshot(save) == before


def test_overwrite_starts_afresh_without_the_earlier_runs_files(data, three_epochs, tmp_path):
    save = _copy(three_epochs, tmp_path / "run")
    stale_threshold = threshold_path(save / "epoch_3.pth")
    stale_threshold.write_text('{"image_score": 0.5}')
    assert train_main(_args(data, save, "--overwrite")) == 0
    assert sorted(p.name for p in save.iterdir()) == ["epoch_1.pth", "log.txt", "train_history.json"]
    log = (save / "log.txt").read_text()
    assert log.startswith("--overwrite: removed the earlier run's files") and log.count("training on") == 1
    history = json.loads((save / "train_history.json").read_text())
    assert [h["epoch"] for h in history["epochs"]] == [1]
    # the fresh epoch 1 is the earlier run's epoch 1: same seed, same run
    for k, v in _ckpt(three_epochs / "epoch_1.pth")["prompt_learner"].items():
        assert torch.equal(_ckpt(save / "epoch_1.pth")["prompt_learner"][k], v), k


def test_resume_with_only_the_paths_continues_the_checkpoints_run(data, three_epochs, tmp_path):
    """No model flags, no --batch_size: the checkpoint's (tiny backbone, batch 4) are used, and the
    run ends where the uninterrupted one did."""
    save = tmp_path / "run"
    assert train_main(_args(data, save)) == 0
    assert train_main(["--train_data_path", str(data), "--save_path", str(save), "--resume", str(save),
                       "--epoch", "3", "--num_workers", "0", "--no_progress", "--device", "cpu"]) == 0
    ref, got = _ckpt(three_epochs / "epoch_3.pth"), _ckpt(save / "epoch_3.pth")
    for k in ref["prompt_learner"]:
        assert torch.equal(got["prompt_learner"][k], ref["prompt_learner"][k]), k
    assert got["train_config"]["batch_size"] == 4 and got["config"] == ref["config"]
    assert got["resumes"] == [{"at_epoch": 1, "from": str(save / "epoch_1.pth"), "changed": {"epoch": [1, 3]}}]
    assert [h["epoch"] for h in got["history"]] == [1, 2, 3]  # the first run's epoch too
    assert [h["epoch"] for h in json.loads((save / "train_history.json").read_text())["epochs"]] == [1, 2, 3]


def test_resume_applies_a_new_learning_rate_and_records_it(data, three_epochs, tmp_path):
    save = _copy(three_epochs, tmp_path / "run")
    for p in ("epoch_2.pth", "epoch_3.pth"):
        (save / p).unlink()
    assert train_main(_args(data, save, "--resume", str(save), "--epoch", "2", "--learning_rate", "0.01")) == 0
    ckpt = _ckpt(save / "epoch_2.pth")
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.01]
    assert ckpt["train_config"]["learning_rate"] == 0.01
    assert ckpt["resumes"][-1]["changed"] == {"learning_rate": [0.001, 0.01], "epoch": [3, 2]}
    assert "--resume: learning_rate 0.001 -> 0.01 from epoch 2 on" in (save / "log.txt").read_text()
    # and the step used it: epoch 2 at lr 0.01 moved the prompts further than the run at 0.001
    start, ref = _ckpt(three_epochs / "epoch_1.pth"), _ckpt(three_epochs / "epoch_2.pth")
    moved = sum(float((ckpt["prompt_learner"][k] - start["prompt_learner"][k]).abs().sum()) for k in ref["prompt_learner"])
    moved_ref = sum(float((ref["prompt_learner"][k] - start["prompt_learner"][k]).abs().sum()) for k in ref["prompt_learner"])
    assert moved > 5 * moved_ref


def test_resume_refuses_flags_that_contradict_the_checkpoint(data, three_epochs, tmp_path, capsys):
    save = _copy(three_epochs, tmp_path / "run")
    before = _snapshot(save)
    assert run_command("train.py", train_main, _args(data, save, "--resume", str(save), "--epoch", "4",
                                                       "--batch_size", "3", "--seed", "7")) == 2
    line = _error_line(capsys)
    assert "--batch_size 3 but the checkpoint has 4" in line and "--seed 7 but the checkpoint has 111" in line
    assert "leave the flags out to use the checkpoint's values" in line
    assert _snapshot(save) == before


def test_resume_refuses_other_training_data(data, three_epochs, tmp_path, capsys):
    other = make_synthetic_dataset(tmp_path / "other", classes=("stripes",), n_train=1, n_test_good=2,
                                   n_test_defect=2, size=48, seed=5)
    save = _copy(three_epochs, tmp_path / "run")
    assert run_command("train.py", train_main, _args(other, save, "--resume", str(save), "--epoch", "4")) == 2
    assert "holds other training data than the checkpoint's (4 images" in _error_line(capsys)


@pytest.mark.parametrize("case", ["resume_elsewhere", "earlier_file", "overwrite_own"])
def test_resume_never_mixes_two_runs_in_one_folder(data, three_epochs, tmp_path, capsys, case):
    save = _copy(three_epochs, tmp_path / "run")
    before = _snapshot(save)
    if case == "resume_elsewhere":  # continuing another folder's run into this one
        other = _copy(three_epochs, tmp_path / "other")
        argv, says = _args(data, save, "--resume", str(other), "--epoch", "4"), "holds the checkpoints of an earlier run"
    elif case == "earlier_file":  # from epoch 1: epoch_2..3 would be replaced one by one
        argv = _args(data, save, "--resume", str(save / "epoch_1.pth"), "--epoch", "2")
        says = "holds later checkpoints (epoch_2.pth .. epoch_3.pth, 2 files)"
    else:
        argv, says = _args(data, save, "--resume", str(save), "--overwrite", "--epoch", "4"), "--overwrite would remove"
    assert run_command("train.py", train_main, argv) == 2
    assert says in _error_line(capsys)
    assert _snapshot(save) == before


# ---------------------------------------------------------------------------- self-contained checkpoints
def _scores(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(2, 3, model.cfg.image_size, model.cfg.image_size)
    with torch.no_grad():
        return model.eval()(x)


def _tiny_json(path: Path, **vision_changes) -> Path:
    cfg, _ = resolve_model_config("tiny", None)
    cfg["vision_cfg"].update(vision_changes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def test_a_checkpoint_of_a_json_backbone_needs_no_json(data, tmp_path, monkeypatch):
    """Trained with a relative --backbone path; then used from another folder (the path no longer
    resolves), after the JSON was edited (a change that alters every feature), and after it was
    deleted: the same scores each time."""
    work = tmp_path / "work"
    _tiny_json(work / "configs" / "mine.json")
    monkeypatch.chdir(work)
    model_flags = ["--backbone", "configs/mine.json"] + TINY_FLAGS[2:]  # tiny's layer settings, our JSON
    assert train_main(_args(data, tmp_path / "run", model=model_flags)) == 0
    ckpt_path = tmp_path / "run" / "epoch_1.pth"
    stored = _ckpt(ckpt_path)["backbone"]
    assert stored["name"] == "configs/mine.json" and stored["model_config"] == resolve_model_config("tiny", None)[0]
    want = _scores(load_model(ckpt_path))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # configs/mine.json does not resolve from here
    got = _scores(load_model(ckpt_path))
    _tiny_json(work / "configs" / "mine.json", mlp_ratio=2.0)  # edited: another tower
    monkeypatch.chdir(work)
    edited = _scores(load_model(ckpt_path))
    (work / "configs" / "mine.json").unlink()
    gone = _scores(load_model(ckpt_path))
    for scores in (got, edited, gone):
        for k in want:
            assert torch.equal(scores[k], want[k]), k
    # the edit does change the model: a --backbone given at load time is built as given
    edited_json = str(_tiny_json(tmp_path / "e.json", mlp_ratio=2.0))
    assert not torch.equal(_scores(load_model(ckpt_path, backbone=edited_json))["image_score"], want["image_score"])


def test_the_weights_sha256_is_recorded_and_other_weights_are_warned_about(data, tmp_path):
    weights = tmp_path / "w" / "tiny_weights.pt"
    weights.parent.mkdir()
    torch.manual_seed(3)
    clip = create_backbone("tiny", None)
    for p in clip.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)  # weights of their own, not the random init
    torch.save(clip.state_dict(), weights)
    model_flags = TINY_FLAGS[:2] + ["--pretrained", str(weights)] + TINY_FLAGS[4:]
    assert train_main(_args(data, tmp_path / "run", model=model_flags)) == 0
    ckpt_path = tmp_path / "run" / "epoch_1.pth"
    record = _ckpt(ckpt_path)["backbone"]
    assert record["pretrained"] == str(weights) and record["weights_sha256"] == file_sha256(weights)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded weights: no warning
        want = _scores(load_model(ckpt_path))
        copy = shutil.copy(weights, tmp_path / "copy.pt")  # the same weights elsewhere: no warning either
        assert torch.equal(_scores(load_model(ckpt_path, pretrained=str(copy)))["image_score"], want["image_score"])

    os.replace(weights, tmp_path / "moved.pt")
    with pytest.raises(FileNotFoundError, match=rf"pass --pretrained PATH to a copy of it \(SHA-256 {record['weights_sha256']}\)"):
        load_model(ckpt_path)
    sd = torch.load(tmp_path / "moved.pt")
    sd["visual.proj"] = sd["visual.proj"] * 1.5
    torch.save(sd, weights)  # other contents under the recorded name
    with pytest.warns(UserWarning, match="pretrained weights differ from those the checkpoint was trained with: "
                                         f"checkpoint weights file with SHA-256 {record['weights_sha256']}, now"):
        load_model(ckpt_path)


def test_convert_records_the_backbone_too(three_epochs):
    from glocalclip.apps.convert import convert_checkpoint

    original = {"prompt_learner": _ckpt(three_epochs / "epoch_1.pth")["prompt_learner"]}  # the original code's layout
    new, _, _ = convert_checkpoint(original, {"backbone": "tiny", "pretrained": None, "image_size": 56})
    assert new["backbone"] == {"name": "tiny", "model_config": resolve_model_config("tiny", None)[0],
                               "pretrained": None, "weights_sha256": None}
