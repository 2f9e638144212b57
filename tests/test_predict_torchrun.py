"""``predict`` under torchrun: two gloo processes on the CPU, each scoring its share of the batches into
the one output folder, write what one process writes (rows in the same order, the same maps), and
``--resume`` continues such a run."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def run_predict(trained, inputs, out: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    cmd = [*launcher, "-m", "glocalclip", "predict", *map(str, inputs), "--checkpoint", str(trained["ckpt"]),
           "--out", str(out), "--device", "cpu", "--batch_size", "2", "--no_progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(got: Path, want: Path) -> None:
    a, b = rows(got), rows(want)
    keys = ("image_path", "pred_score", "pred_label", "map_max")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]  # same order, same text
    for ra, rb in zip(a, b):
        assert Path(ra["anomaly_map"]).relative_to(got) == Path(rb["anomaly_map"]).relative_to(want)
        assert np.array_equal(np.load(ra["anomaly_map"]), np.load(rb["anomaly_map"]))
        assert Path(ra["overlay"]).is_file()
    assert len((got / "predictions.jsonl").read_text().splitlines()) == len(a)
    assert not (got / ".lock").exists() and sorted(p.name for p in got.iterdir()) == \
        sorted(p.name for p in want.iterdir())


def test_two_processes_write_what_one_writes_and_resume(trained, tmp_path):
    inputs = sorted(trained["inputs"].rglob("*.png"))  # 4 images and one corrupt file: 3 batches of 2
    assert len(inputs) == 5
    one = run_predict(trained, inputs, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr
    two = run_predict(trained, inputs, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(rows(tmp_path / "one")) == 4
    assert_same_run(tmp_path / "two", tmp_path / "one")
    assert two.stdout.count("predict: 4 scored") == 1  # the main process reports, once, for all
    assert "1 skipped" in two.stdout and two.stderr.count("skipped") == 1  # the corrupt file, by its process

    part = run_predict(trained, inputs[:2], tmp_path / "resumed", 2)  # two images, then the rest with --resume
    assert part.returncode == 0, part.stderr[-3000:]
    rest = run_predict(trained, inputs, tmp_path / "resumed", 2, "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "predict: 2 scored" in rest.stdout
    assert sorted(r["image_path"] for r in rows(tmp_path / "resumed")) == \
        sorted(r["image_path"] for r in rows(tmp_path / "one"))

    refused = run_predict(trained, inputs, tmp_path / "two", 2)  # an earlier run, no --resume: every process refuses
    assert refused.returncode != 0 and "--resume" in refused.stderr
    assert_same_run(tmp_path / "two", tmp_path / "one")
