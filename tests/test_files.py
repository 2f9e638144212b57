"""glocalclip.files: atomic writes with the umask's permissions, one message per I/O error with
nothing half written left behind, and the leftovers of killed runs removed (a real SIGKILL)."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from glocalclip import files
from glocalclip.datasets.meta import write_meta
from glocalclip.engine.checkpoint import atomic_save
from glocalclip.files import OutputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def umask():
    """Set the process umask for one test, then restore it."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda value: os.umask(value)
    os.umask(saved)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_umasks_permissions(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_save({"epoch": 1}, tmp_path / "epoch_1.pth")  # checkpoints
    write_meta(str(tmp_path), {"train": {}, "test": {}})  # meta.json
    files.write_npy(tmp_path / "map.npy", np.zeros((2, 3), np.float32))
    files.write_png(tmp_path / "pic.png", np.zeros((4, 5, 3), np.uint8))
    for name in ("epoch_1.pth", "meta.json", "map.npy", "pic.png"):
        assert _mode(tmp_path / name) == expected, name
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.pth", "map.npy", "meta.json", "pic.png"]


def test_every_writer_round_trips(tmp_path):
    files.write_json(tmp_path / "a" / "b.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"x": [1, 2]}
    files.write_csv(tmp_path / "c.csv", ["k", "v"], [["a", 1], ["b", 2]])
    assert (tmp_path / "c.csv").read_text().splitlines() == ["k,v", "a,1", "b,2"]
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(np.load(files.write_npy(tmp_path / "m.npy", arr)), arr)
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red stays red (RGB in, not BGR)
    import cv2

    back = cv2.imread(str(files.write_png(tmp_path / "p.png", rgb)))[..., ::-1]
    np.testing.assert_array_equal(back, rgb)
    t = torch.arange(5.0)
    assert torch.equal(torch.load(files.write_torch(tmp_path / "t.pth", {"t": t}))["t"], t)
    files.write_text(tmp_path / "log.txt", "one\n")
    files.append_text(tmp_path / "log.txt", "two\n")
    assert (tmp_path / "log.txt").read_text() == "one\ntwo\n"


def _failing(name: str, code: int):
    """A stand-in for os.<name> that raises OSError(code)."""
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize("call, code, says", [
    ("write", errno.ENOSPC, "no space left on the device"),
    ("fsync", errno.EDQUOT, "no space left on the device"),
    ("replace", errno.EROFS, "read-only file system"),
    ("open", errno.EACCES, "permission denied"),
])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, call, code, says):
    target = tmp_path / "results.json"
    target.write_text("OLD")
    monkeypatch.setattr(os, call, _failing(call, code))
    with pytest.raises(OutputError) as info:
        files.write_json(target, {"new": 1})
    monkeypatch.undo()
    msg = str(info.value)
    assert str(target) in msg and says in msg and "\n" not in msg
    assert info.value.errno == code and info.value.filename == str(target)
    assert target.read_text() == "OLD"
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_write_that_may_not_replace_keeps_an_existing_file_even_one_made_meanwhile(tmp_path, monkeypatch):
    target = tmp_path / "bank.pt"
    assert files.write_bytes(target, b"NEW", replace=False) == target and target.read_bytes() == b"NEW"
    with pytest.raises(OutputError, match="bank.pt: a file of that name exists and is kept") as info:
        files.write_bytes(target, b"NEWER", replace=False)
    assert info.value.errno == errno.EEXIST and target.read_bytes() == b"NEW"
    # a second process writes the name after the temp file is written and before it is placed: kept too
    other = tmp_path / "raced.pt"
    real_link = os.link

    def second_process_first(src, dst):
        subprocess.run([sys.executable, "-c", f"open({str(other)!r}, 'wb').write(b'OTHER')"], check=True)
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", second_process_first)
    with pytest.raises(OutputError, match="raced.pt: a file of that name exists and is kept"):
        files.write_bytes(other, b"MINE", replace=False)
    assert other.read_bytes() == b"OTHER"
    # a file system without hard links: a check, then the rename
    monkeypatch.setattr(os, "link", _failing("link", errno.EPERM))
    with pytest.raises(OutputError, match="exists and is kept"):
        files.write_bytes(target, b"NEWER", replace=False)
    files.write_bytes(tmp_path / "fresh.pt", b"FRESH", replace=False)
    monkeypatch.undo()
    assert target.read_bytes() == b"NEW" and (tmp_path / "fresh.pt").read_bytes() == b"FRESH"
    assert files.write_bytes(target, b"ASKED") and target.read_bytes() == b"ASKED"  # replace, the default
    assert sorted(os.listdir(tmp_path)) == ["bank.pt", "fresh.pt", "raced.pt"]  # no temp file left


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EACCES])
def test_a_write_that_may_not_replace_works_where_hard_links_are_refused(tmp_path, monkeypatch, code):
    """Windows' FAT/exFAT answer os.link with EINVAL, some SMB/FUSE mounts with EACCES: the check and
    the rename stand in, rather than the write failing."""
    monkeypatch.setattr(os, "link", _failing("link", code))
    assert files.write_bytes(tmp_path / "bank.pt", b"NEW", replace=False).read_bytes() == b"NEW"
    with pytest.raises(OutputError, match="exists and is kept"):
        files.write_bytes(tmp_path / "bank.pt", b"NEWER", replace=False)
    assert os.listdir(tmp_path) == ["bank.pt"]


def test_a_placed_file_stays_written_when_its_temp_name_cannot_be_removed(tmp_path, monkeypatch):
    """After the hard link the file is in place: a temp name that cannot be removed (held open by a
    scanner on Windows) is left, not reported as a failed write."""
    monkeypatch.setattr(os, "unlink", _failing("unlink", errno.EACCES))
    assert files.write_bytes(tmp_path / "bank.pt", b"NEW", replace=False).read_bytes() == b"NEW"
    monkeypatch.undo()
    assert "bank.pt" in os.listdir(tmp_path)


def test_a_file_where_a_folder_should_be_is_named(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    for write in (lambda: files.write_json(blocker / "a" / "b.json", {}),
                  lambda: files.prepare_output_dir(blocker / "a"),
                  lambda: files.prepare_output_dir(blocker)):
        with pytest.raises(OutputError) as info:
            write()
        assert f"{blocker} is a file, not a folder" in str(info.value)
    assert os.listdir(tmp_path) == ["runs"]


def test_prepare_output_dir_finds_a_full_disk_before_the_work(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "write", _failing("write", errno.ENOSPC))
    with pytest.raises(OutputError, match="no space left"):
        files.prepare_output_dir(tmp_path / "out")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "out") == []


KILLED_WRITER = """
import os, sys, time
import torch
from glocalclip import files
from glocalclip.engine.feature_cache import FeatureCache

folder = sys.argv[1]
cache = FeatureCache(4, 8, 5, 16, (1,), 8, "disk", torch.device("cpu"), disk_dir=folder)  # kept alive
real_write = os.write

def stalled(fd, data):  # half a checkpoint written, then the process hangs until killed
    real_write(fd, bytes(data[:16]))
    print("writing", flush=True)
    time.sleep(120)

os.write = stalled
files.write_torch(os.path.join(folder, "epoch_3.pth"), {"x": torch.zeros(100)})
"""


def killed_run_leftovers(folder: Path) -> list[str]:
    """Run a writer in a subprocess, SIGKILL it mid-checkpoint; the names it left in ``folder``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(folder)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return sorted(os.listdir(folder))


def test_leftovers_of_a_sigkilled_run_are_removed_and_nothing_else(tmp_path):
    left = killed_run_leftovers(tmp_path)
    assert len(left) == 2
    assert left[0].startswith(".epoch_3.pth.") and left[0].endswith(".tmp")
    assert left[1].startswith("glocalclip_cache_") and (tmp_path / left[1] / "patches_0.npy").is_file()
    # what must survive: a live process's temp file (ours), other people's files, look-alikes
    fd, live = files._open_temp(tmp_path / "epoch_4.pth")
    os.close(fd)
    keep = ["epoch_2.pth", "notes.tmp", ".epoch_1.pth.otherhost.1.0123abcd.tmp", "glocalclip_cache_x"]
    for name in keep[:3]:
        (tmp_path / name).write_text("keep")
    (tmp_path / keep[3]).mkdir()
    time.sleep(0.05)
    removed = files.remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == left
    assert sorted(os.listdir(tmp_path)) == sorted(keep + [live.name])


def test_removed_if_left_empty_removes_only_what_it_created_and_only_when_empty(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(KeyError):
        with files.removed_if_left_empty(tmp_path / "old" / "a" / "b") as folder:
            folder.mkdir(parents=True)
            raise KeyError("the command failed")
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and not any((tmp_path / "old").iterdir())
    with pytest.raises(KeyError):  # something written: kept, with its parents
        with files.removed_if_left_empty(tmp_path / "old" / "c" / "d") as folder:
            folder.mkdir(parents=True)
            (folder / "result.json").write_text("{}")
            raise KeyError("failed after writing")
    assert (tmp_path / "old" / "c" / "d" / "result.json").is_file()
    with files.removed_if_left_empty(tmp_path / "ok") as folder:  # success: kept even when empty
        folder.mkdir()
    assert (tmp_path / "ok").is_dir()
