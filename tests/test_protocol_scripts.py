"""train.sh / test.sh run a paper setting end to end (tiny backbone, synthetic stand-in data),
skip a dataset whose folder is missing, and finish with the summary table."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glocalclip.datasets.synthetic import make_synthetic_dataset

pytestmark = pytest.mark.slow  # end to end: train.sh / test.sh in subprocesses

REPO = Path(__file__).resolve().parents[1]
TINY = ("--backbone tiny --pretrained none --image_size 56 --features_list 2 4 6 8 --dpam 6 "
        "--depth 3 --t_n_ctx 2 --num_workers 0 --no_progress --device cpu")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_train_and_test_scripts_run_a_setting(tmp_path):
    data = tmp_path / "data"
    # stand-ins with the real datasets' class names, so --dataset visa / mvtec accept them
    make_synthetic_dataset(data / "visa", classes=("candle", "capsules"), n_train=0, n_test_good=3,
                           n_test_defect=3, size=48, seed=1)
    make_synthetic_dataset(data / "mvtec", classes=("bottle", "carpet"), n_train=0, n_test_good=3,
                           n_test_defect=3, size=48, seed=2)
    env = {**os.environ, "DATA_ROOT": str(data), "OUT_ROOT": str(tmp_path / "runs"), "EPOCHS": "1",
           "ALPHAS": "1.0", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "EXTRA_TRAIN_FLAGS": TINY, "EXTRA_TEST_FLAGS": TINY.replace("--depth 3 --t_n_ctx 2 ", "")}
    run = subprocess.run(["bash", str(REPO / "train.sh"), "visa2mvtec", "colondb2clinicdb"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr  # colondb is missing: reported, the rest ran
    assert "skip colondb" in run.stderr
    ckpt = tmp_path / "runs" / "visa2mvtec" / "alpha_1.0" / "checkpoints" / "epoch_1.pth"
    assert ckpt.is_file()
    import torch

    cfg = torch.load(ckpt, weights_only=True)["config"]
    assert (cfg["n_ctx"], cfg["ab_ctx"]) == (13, 13)  # the setting's prompt lengths
    run = subprocess.run(["bash", str(REPO / "test.sh"), "visa2mvtec", "mvtec2industrial"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "skip mvtec2industrial alpha 1.0: no checkpoint" in run.stderr
    assert (tmp_path / "runs" / "visa2mvtec" / "alpha_1.0" / "test" / "mvtec" / "results.json").is_file()
    summary = (tmp_path / "runs" / "summary.md").read_text()
    assert "91.4" in summary  # the paper's MVTec pixel AUROC beside ours
    import json

    ours = json.loads((tmp_path / "runs" / "visa2mvtec" / "alpha_1.0" / "test" / "mvtec" / "results.json")
                      .read_text())["mean"]["pixel_auroc"]
    assert f"{100 * ours:.1f}" in summary  # ... and our own number from the run's results
    assert "summary of 1 test runs" in run.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_train_sh_again_resumes_its_runs_instead_of_refusing(tmp_path):
    """train.sh over settings already trained continues each run (nothing to do when finished), and
    with more epochs trains on from the last checkpoint: train.py alone refuses a folder holding a run."""
    data = tmp_path / "data"
    make_synthetic_dataset(data / "visa", classes=("candle", "capsules"), n_train=0, n_test_good=2,
                           n_test_defect=2, size=48, seed=1)
    env = {**os.environ, "DATA_ROOT": str(data), "OUT_ROOT": str(tmp_path / "runs"), "EPOCHS": "1",
           "ALPHAS": "1.0", "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "EXTRA_TRAIN_FLAGS": TINY}
    ckpts = tmp_path / "runs" / "visa2mvtec" / "alpha_1.0" / "checkpoints"

    def train_sh(epochs: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "train.sh"), "visa2mvtec"], env={**env, "EPOCHS": epochs},
                              capture_output=True, text=True, timeout=300)

    assert train_sh("1").returncode == 0
    first = (ckpts / "epoch_1.pth").read_bytes()
    again = train_sh("1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (ckpts / "epoch_1.pth").read_bytes() == first  # a finished run is left as it is
    more = train_sh("2")
    assert more.returncode == 0, more.stdout + more.stderr
    assert (ckpts / "epoch_2.pth").is_file() and (ckpts / "epoch_1.pth").read_bytes() == first
