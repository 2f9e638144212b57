"""Predictions are never lost: the output folder's lock, the rows appended batch by batch
(all or none), a rerun that refuses or resumes or overwrites, and predict end to end under Ctrl-C,
a second process, a SIGKILL and a full disk."""
from __future__ import annotations

import errno
import json
import os
import signal
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
    preds = PredictionsFile(tmp_path, FIELDS).check(resume=False, overwrite=False).start()
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
    first = PredictionsFile(tmp_path, FIELDS).check(resume=False, overwrite=False).start()
    first.append([_row(0), _row(1), _row(2)])
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "0.npy").write_bytes(b"x")
    with open(tmp_path / JSONL_NAME, "a") as f:
        f.write('{"image_path": "img/3.png", "pred_sc')  # a line cut short by a kill
    with pytest.raises(ValueError, match=r"holds the predictions of an earlier run \(3 rows in predictions.csv, 1 maps\); "
                                         r"continue it with --resume .* replace it with --overwrite"):
        PredictionsFile(tmp_path, FIELDS).check(resume=False, overwrite=False).start()
    with pytest.raises(ValueError, match="give one"):
        PredictionsFile(tmp_path, FIELDS).check(resume=True, overwrite=True)
    resumed = PredictionsFile(tmp_path, FIELDS).check(resume=True, overwrite=False).start()
    assert resumed.kept == [_row(0), _row(1), _row(2)]
    assert resumed.done() == {os.path.abspath(f"img/{i}.png") for i in range(3)}
    assert [json.loads(x) for x in (tmp_path / JSONL_NAME).read_text().splitlines()] == resumed.kept
    PredictionsFile(tmp_path, FIELDS).check(resume=False, overwrite=True).start()
    assert earlier_outputs(tmp_path) == []  # a header alone is no earlier run
    assert not (tmp_path / "maps").exists() and (tmp_path / CSV_NAME).read_text().strip() == ",".join(FIELDS)


# ---------------------------------------------------------------------------- predict end to end
from conftest import good_inputs, sigint_as_ctrl_c  # noqa: E402  (the trained fixture is conftest's: built once a session)

REPO = Path(__file__).resolve().parents[1]


def _predict(trained, out: Path, inputs, *extra: str) -> list[str]:
    return ["--checkpoint", str(trained["ckpt"]), *map(str, inputs), "--out", str(out), "--sigma", "4",
            "--device", "cpu", "--no_progress", *extra]


def _rows(out: Path) -> list[dict]:
    import csv

    with open(out / CSV_NAME, newline="") as f:
        return list(csv.DictReader(f))


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / JSONL_NAME).read_text().splitlines()]


@pytest.fixture(scope="module")
def many_inputs(trained, tmp_path_factory) -> list[Path]:
    """300 small pictures: a predict that runs for seconds."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("many")
    src = Image.open(good_inputs(trained)[0]).convert("RGB").resize((40, 40))
    for i in range(300):
        src.rotate(i % 360).save(folder / f"p{i:03d}.png")
    return sorted(folder.glob("*.png"))


def _start_predict(trained, out: Path, inputs, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "glocalclip", "predict", *_predict(trained, out, inputs, *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=sigint_as_ctrl_c)


def _wait_for(condition, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_after_two_batches_keeps_their_rows_and_resume_finishes(trained, tmp_path, monkeypatch, capsys):
    from glocalclip.apps.cli import run_command
    from glocalclip.inference.predictor import Predictor
    from glocalclip.apps.predict_cli import predict_main

    out, goods = tmp_path / "out", good_inputs(trained)
    real, calls = Predictor.predict_uint8, []

    def stopped_at_the_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_uint8", stopped_at_the_third)
    assert run_command("glocalclip predict", predict_main, _predict(trained, out, goods, "--batch_size", "1")) == 130
    err = capsys.readouterr().err
    assert f"the 2 rows scored so far are in {out / CSV_NAME}; continue with --resume" in err
    first = _rows(out)
    assert [r["image_path"] for r in first] == list(map(str, goods[:2])) and len(_jsonl(out)) == 2
    assert all(Path(r["anomaly_map"]).is_file() and Path(r["overlay"]).is_file() for r in first)
    assert not (out / LOCK_FILE).exists()

    monkeypatch.undo()
    assert predict_main(_predict(trained, out, goods, "--batch_size", "1", "--resume")) == 0
    assert "2 of the inputs were scored already and are skipped" in capsys.readouterr().err
    rows = _rows(out)
    assert rows[:2] == first and [r["image_path"] for r in rows] == list(map(str, goods))
    assert [j["image_path"] for j in _jsonl(out)] == [r["image_path"] for r in rows]


@pytest.mark.slow
def test_a_second_predict_into_the_same_out_refuses_naming_the_first(trained, many_inputs, tmp_path, capsys):
    from glocalclip.apps.cli import run_command
    from glocalclip.apps.predict_cli import predict_main

    out = tmp_path / "out"
    first = _start_predict(trained, out, many_inputs, "--batch_size", "1")
    try:
        _wait_for(lambda: (out / LOCK_FILE).is_file() and f'"pid": {first.pid}' in (out / LOCK_FILE).read_text())
        first.send_signal(signal.SIGSTOP)  # held mid-run, however slow the machine: it cannot finish meanwhile
        try:
            assert run_command("glocalclip predict", predict_main, _predict(trained, out, good_inputs(trained))) == 2
            assert first.poll() is None  # the first is still at work
        finally:
            first.send_signal(signal.SIGCONT)
        err = capsys.readouterr().err
        assert f"--out {out} is in use by another glocalclip predict (pid {first.pid} on host" in err
        _wait_for(lambda: (out / CSV_NAME).is_file() and len(_rows(out)) >= 1)
        first.send_signal(signal.SIGINT)  # Ctrl-C: the first stops, with what it scored
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, stderr
    assert "continue with --resume" in stderr
    rows = [r["image_path"] for r in _rows(out)]
    assert rows == list(map(str, many_inputs[:len(rows)]))  # the first's rows alone: untouched by the second
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_sigkilled_predict_keeps_whole_rows_and_resume_takes_over_its_lock(trained, many_inputs, tmp_path, capsys):
    import numpy as np

    from glocalclip.apps.predict_cli import predict_main

    out = tmp_path / "out"
    killed = _start_predict(trained, out, many_inputs, "--batch_size", "4")
    _wait_for(lambda: (out / CSV_NAME).is_file() and len(_rows(out)) >= 8)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    rows = _rows(out)
    assert 8 <= len(rows) < len(many_inputs) and len(rows) % 4 == 0  # whole batches only
    for r in rows:
        assert np.load(r["anomaly_map"]).shape == (40, 40)  # every row's map is whole
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == killed.pid

    assert predict_main(_predict(trained, out, many_inputs, "--batch_size", "16", "--resume")) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {out} left by pid {killed.pid}" in err
    done = _rows(out)
    assert done[:len(rows)] == rows and sorted(r["image_path"] for r in done) == sorted(map(str, many_inputs))
    assert not list(out.rglob("*.tmp")) and not (out / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_rerun_refuses_and_overwrite_leaves_no_stale_file(trained, tmp_path, capsys):
    from glocalclip.apps.cli import run_command
    from glocalclip.apps.predict_cli import predict_main

    out, goods = tmp_path / "out", good_inputs(trained)
    assert predict_main(_predict(trained, out, goods)) == 0
    before = _rows(out)
    assert run_command("glocalclip predict", predict_main, _predict(trained, out, goods[:2])) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds the predictions of an earlier run (4 rows in predictions.csv, 4 maps)" in err
    assert "--resume" in err and "--overwrite" in err and _rows(out) == before
    assert predict_main(_predict(trained, out, goods[2:], "--overwrite")) == 0
    names = {p.stem for p in goods[2:]}
    assert {p.stem for p in (out / "maps").rglob("*.npy")} == names
    assert {p.stem for p in (out / "overlays").rglob("*.png")} == names
    assert [r["image_path"] for r in _rows(out)] == list(map(str, goods[2:]))


@pytest.mark.slow
def test_a_full_disk_while_saving_a_map_is_one_message_and_keeps_the_rows(trained, tmp_path, monkeypatch, capsys):
    import numpy as np

    from glocalclip.apps.cli import run_command
    from glocalclip.apps.predict_cli import predict_main

    out, goods = tmp_path / "out", good_inputs(trained)
    real_write, maps = os.write, []

    def full_at_the_third_map(fd, data):
        if bytes(data[:6]) == b"\x93NUMPY":
            maps.append(1)
            if len(maps) == 3:
                real_write(fd, bytes(data[:40]))  # part of it lands, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_at_the_third_map)
    assert run_command("glocalclip predict", predict_main, _predict(trained, out, goods, "--batch_size", "2")) == 2
    err = capsys.readouterr().err
    line = [x for x in err.strip().splitlines() if "error:" in x]
    assert len(line) == 1 and "Traceback" not in err
    assert f"cannot write {out / 'maps'}" in line[0] and "no space left on the device" in line[0]
    rows = _rows(out)
    assert [r["image_path"] for r in rows] == list(map(str, goods[:2]))  # the first batch's rows kept
    assert not list(out.rglob("*.tmp"))
    for npy in out.rglob("*.npy"):
        np.load(npy)  # no truncated map


@pytest.mark.slow
def test_predict_overlays_say_prediction_and_the_thresholds_origin(trained, tmp_path, monkeypatch, capsys):
    from glocalclip.inference import images
    from glocalclip.apps.predict_cli import predict_main
    from glocalclip.engine.checkpoint import read_threshold

    written: list[list[str]] = []
    real = images.captioned
    monkeypatch.setattr(images, "captioned", lambda img, text, *a: written.append(list(text)) or real(img, text, *a))
    out = tmp_path / "out"
    assert predict_main(_predict(trained, out, good_inputs(trained))) == 0
    thr = read_threshold(trained["ckpt"])["image_score"]
    rows = _rows(out)
    assert len(written) == len(rows) == 4
    for lines, r in zip(written, rows):
        predicted = "anomalous" if int(r["pred_label"]) else "normal"
        relation = ">=" if int(r["pred_label"]) else "<"
        assert lines == [f"predicted: {predicted}", f"score {float(r['pred_score']):.3f} {relation} threshold {thr:.4g}",
                         "threshold: best F1 on the test set of data, sigma 4", "map smoothed with sigma 4"]
    assert f"labels: threshold {thr:.4g} (best F1 on the test set of data, σ 4)" in capsys.readouterr().out
