"""Predictions are never lost (issue 14): the output folder's lock, the rows appended batch by batch
(all or none), a rerun that refuses or resumes or overwrites, and predict end to end under Ctrl-C,
a second process, a SIGKILL and a full disk."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glocalclip.apps.predict_runs import CSV_NAME, JSONL_NAME, PredictionsFile, earlier_outputs
from glocalclip.files import append_all
from glocalclip.locks import LOCK_FILE, FolderInUse, FolderLock

FIELDS = ("image_path", "pred_score", "pred_label", "anomaly_map", "map_max", "overlay")
HOLD_LOCK = ("import sys, time\nfrom glocalclip.locks import FolderLock\nlock = FolderLock(sys.argv[1], 'predict').acquire()\n"
             "print('held', flush=True)\ntime.sleep(60)\n")


def _row(i: int) -> dict:
    return {"image_path": f"img/{i}.png", "pred_score": 0.25 + i, "pred_label": i % 2, "anomaly_map": f"maps/{i}.npy",
            "map_max": 1.5, "overlay": None}


# ---------------------------------------------------------------------------- the lock
def test_a_folder_held_by_another_process_is_refused_naming_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUse, match=rf"--out {tmp_path} is in use by another glocalclip predict "
                                              rf"\(pid {holder.pid} on host .*\); wait for it to finish"):
            FolderLock(tmp_path, "predict").acquire()
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock file stays, holds nothing, and is taken over
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with FolderLock(tmp_path, "predict") as lock:
        assert lock.taken_over["pid"] == holder.pid
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


# ---------------------------------------------------------------------------- the rows
def test_a_failed_append_leaves_neither_file_with_half_a_batch(tmp_path, monkeypatch):
    preds = PredictionsFile(tmp_path, FIELDS).open(resume=False, overwrite=False)
    preds.append([_row(0), _row(1)])
    before = {n: (tmp_path / n).read_bytes() for n in (CSV_NAME, JSONL_NAME)}
    real_write = os.write
    calls = []

    def full_on_the_jsonl(fd, data):  # the CSV's rows go in, the JSONL's do not
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_on_the_jsonl)
    with pytest.raises(OSError, match="no space left on the device"):
        preds.append([_row(2), _row(3)])
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in (CSV_NAME, JSONL_NAME)} == before


def test_append_all_cuts_back_what_a_failure_left(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    append_all(path, "a,b\n")
    real_write = os.write

    def half_then_full(fd, data):  # half the bytes land, then the disk is full
        if len(data) > 4:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        append_all(path, "1,2\n3,4\n5,6\n")
    assert path.read_text() == "a,b\n"


def test_an_earlier_run_is_refused_resumed_or_overwritten(tmp_path):
    first = PredictionsFile(tmp_path, FIELDS).open(resume=False, overwrite=False)
    first.append([_row(0), _row(1), _row(2)])
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "0.npy").write_bytes(b"x")
    with open(tmp_path / JSONL_NAME, "a") as f:
        f.write('{"image_path": "img/3.png", "pred_sc')  # a line cut short by a kill
    with pytest.raises(ValueError, match=r"holds the predictions of an earlier run \(3 rows in predictions.csv, 1 maps\); "
                                         r"continue it with --resume .* replace it with --overwrite"):
        PredictionsFile(tmp_path, FIELDS).open(resume=False, overwrite=False)
    with pytest.raises(ValueError, match="give one"):
        PredictionsFile(tmp_path, FIELDS).open(resume=True, overwrite=True)
    resumed = PredictionsFile(tmp_path, FIELDS).open(resume=True, overwrite=False)
    assert resumed.kept == [_row(0), _row(1), _row(2)]
    assert resumed.done() == {os.path.abspath(f"img/{i}.png") for i in range(3)}
    assert [json.loads(x) for x in (tmp_path / JSONL_NAME).read_text().splitlines()] == resumed.kept
    PredictionsFile(tmp_path, FIELDS).open(resume=False, overwrite=True)
    assert earlier_outputs(tmp_path) == [tmp_path / CSV_NAME, tmp_path / JSONL_NAME]
    assert not (tmp_path / "maps").exists() and (tmp_path / CSV_NAME).read_text().strip() == ",".join(FIELDS)
