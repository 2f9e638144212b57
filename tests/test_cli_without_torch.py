"""The command line without torch: every command's ``--help`` loads no torch, and where torch cannot
be imported a failing command prints one line, not a traceback (the error handler imports nothing
heavy). Times are printed, not asserted; bench/ holds speed targets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from glocalclip.apps.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]

def _commands() -> list:
    return list(_entries())


def _entries():
    for name in sorted(COMMANDS):
        yield pytest.param(["-m", "glocalclip", name], id=name)
    yield pytest.param([str(REPO / "train.py")], id="train.py")
    yield pytest.param([str(REPO / "test.py")], id="test.py")


PROBE = ("import runpy, sys, time\n"
         "t0 = time.perf_counter()\n"
         "module = sys.argv[1] == '-m'\n"
         "sys.argv = sys.argv[2:] if module else sys.argv[1:]\n"
         "try:\n"
         "    runpy.run_module(sys.argv[0], run_name='__main__') if module else "
         "runpy.run_path(sys.argv[0], run_name='__main__')\n"
         "except SystemExit as e:\n"
         "    code = e.code\n"
         "print('HELP-PROBE', code, 'torch' in sys.modules, 'open_clip' in sys.modules, "
         "f'{time.perf_counter() - t0:.3f}', file=sys.stderr)\n")


@pytest.mark.parametrize("entry", _commands())
def test_every_command_s_help_loads_neither_torch_nor_open_clip(entry):
    run = subprocess.run([sys.executable, "-c", PROBE, *entry, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    probe = [line for line in run.stderr.splitlines() if line.startswith("HELP-PROBE")]
    assert probe, run.stderr
    _, code, torch_loaded, open_clip_loaded, seconds = probe[-1].split()
    print(f"{' '.join(entry[1:] if entry[0] == '-m' else entry)} --help: {seconds} s")
    assert (code, torch_loaded, open_clip_loaded) == ("0", "False", "False"), run.stderr
    assert "usage:" in run.stdout and "--help" in run.stdout  # the flags were listed


@pytest.fixture()
def no_torch(tmp_path):
    """An environment where ``import torch`` and ``import open_clip`` fail as they do where the packages
    are absent: a folder first on PYTHONPATH whose ``torch`` and ``open_clip`` raise
    ModuleNotFoundError."""
    for name in ("torch", "open_clip"):
        (tmp_path / "shim" / name).mkdir(parents=True)
        (tmp_path / "shim" / name / "__init__.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}'\", name={name!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), str(REPO)])}
    env.pop("GLOCALCLIP_TRACEBACK", None)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'torch'" in check.stderr  # the shim works
    return env


def _glocalclip(env, *args):
    return subprocess.run([sys.executable, "-m", "glocalclip", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_a_failing_torch_free_command_without_torch_prints_one_line(no_torch, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    missing = tmp_path / "missing.onnx"
    run = _glocalclip(no_torch, "predict", "--model", str(missing), str(tmp_path / "a.png"))
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("glocalclip predict: error: ") and str(missing) in lines[0]


@pytest.mark.parametrize("args", [["train", "--train_data_path", "data"], ["convert", "old.pth", "new.pt"],
                                  ["test", "--checkpoint_path", "c.pt", "--data_path", "data"]], ids=lambda a: a[0])
def test_a_command_that_needs_torch_says_so_in_one_line_where_torch_is_missing(no_torch, args):
    run = _glocalclip(no_torch, *args)
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith(f"glocalclip {args[0]}: error: this command needs torch")


def test_a_mistyped_flag_is_refused_before_torch_loads(no_torch):
    run = _glocalclip(no_torch, "convert", "old.pth", "new.pt", "--n_ctxx", "3")
    assert run.returncode == 2 and "unrecognized arguments: --n_ctxx" in run.stderr, run.stderr
    assert "needs torch" not in run.stderr


@pytest.mark.parametrize("command", ["train", "test", "export", "convert"])
def test_the_flags_of_parsers_py_load_no_numpy(command):
    """``apps/parsers.py`` serves these commands' flags; it reads ``deploy.metadata`` for --int8/--half,
    and the deploy package loads its runtime (numpy, Pillow) only on first use."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['glocalclip', {command!r}, '--help']\n"
            "try:\n    runpy.run_module('glocalclip', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'numpy' in sys.modules, 'PIL' in sys.modules, file=sys.stderr)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "LOADED False False" in run.stderr, run.stderr
