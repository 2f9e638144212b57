"""``glocalclip export`` over an earlier export: a failed or interrupted export (a full disk while
writing the graph or in the int8 step, Ctrl-C during quantization, the int8 block-count refusal)
leaves the earlier file (one protobuf, or a graph with its weights in OUT.data) byte for byte as it
was, scoring exactly as before, with no scratch folder beside it; its I/O errors are one message
naming the path and the fix. A successful one replaces the earlier export whole, stale OUT.data
included."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="needs the deploy extra: pip install -e '.[deploy]'")
pytest.importorskip("onnxscript", reason="needs the deploy extra: pip install -e '.[deploy]'")
pytest.importorskip("onnxruntime", reason="needs the deploy extra: pip install -e '.[deploy]'")

from glocalclip.deploy import OnnxPredictor  # noqa: E402
from glocalclip.deploy import export as export_module  # noqa: E402
from glocalclip.files import OutputError, host_tag  # noqa: E402
from glocalclip.settings import SettingError  # noqa: E402

PIXELS = np.random.default_rng(5).integers(0, 256, (2, 112, 112, 3), dtype=np.uint8)
_TRACED: dict[int, bytes] = {}  # image size -> the tiny checkpoint's traced graph, serialised


@pytest.fixture
def traced_once(monkeypatch):
    """``export_onnx`` with the torch trace of the tiny checkpoint done once per session and a fresh
    copy of it handed to each export (the failures here are in writing, not tracing: ~1 s an export
    instead of ~10-30 s). Only for ``tiny_checkpoint``."""
    import torch
    from onnxscript import ir

    trace = export_module._export_program

    def reuse(detector, image_size):
        if image_size not in _TRACED:
            _TRACED[image_size] = ir.serde.serialize_model(trace(detector, image_size).model).SerializeToString()
        return torch.onnx.ONNXProgram(ir.serde.deserialize_model(onnx.load_from_string(_TRACED[image_size])), None)

    monkeypatch.setattr(export_module, "_export_program", reuse)


def external_data_limit(monkeypatch) -> None:
    """Weights past this go to OUT.data: the tiny model's ~6 MB do."""
    monkeypatch.setattr(export_module, "PROTOBUF_LIMIT", export_module.GRAPH_HEADROOM + 1)


def folder_contents(folder: Path) -> dict[str, bytes]:
    """Every entry under ``folder`` (folders as b"<dir>"), by relative name."""
    return {str(p.relative_to(folder)): (b"<dir>" if p.is_dir() else p.read_bytes()) for p in folder.rglob("*")}


def outputs(path: Path) -> list[np.ndarray]:
    return list(OnnxPredictor(path).run(PIXELS))


@pytest.fixture(params=["one file", "external data"])
def earlier(request, tiny_checkpoint, tiny_onnx, tmp_path, traced_once):
    """A successful earlier export at ``tmp_path/out/model.onnx``: the one-protobuf file, or the same
    model with its weights in ``model.onnx.data``."""
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    if request.param == "one file":
        shutil.copy(tiny_onnx, out)
    else:
        with pytest.MonkeyPatch.context() as m:
            external_data_limit(m)
            export_module.export_onnx(tiny_checkpoint, out)
        assert (out.parent / "model.onnx.data").is_file() and out.stat().st_size < 200_000
    return out


# ---------------------------------------------------------------------------- the injected failures
def disk_full(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))


def quantizer_fails(monkeypatch, error: type[BaseException]) -> None:
    """onnxruntime's quantizer writes part of its output, then the disk is full (or Ctrl-C comes)."""
    import onnxruntime.quantization

    def partial(model_input, model_output, **kwargs):
        Path(model_output).write_bytes(b"\x08\x07" * 1000)
        raise disk_full(model_output) if error is OSError else error()

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", partial)


def graph_save_fails(monkeypatch) -> None:
    """The float32 graph and OUT.data are written, then the last write finds the disk full (the files
    cut to half: what a full disk leaves)."""
    import torch

    save = torch.onnx.ONNXProgram.save

    def half_written(self, destination, **kwargs):
        save(self, destination, **kwargs)
        for p in (Path(destination), Path(f"{destination}.data")):
            if p.is_file():
                os.truncate(p, p.stat().st_size // 2)
        raise disk_full(destination)

    monkeypatch.setattr(torch.onnx.ONNXProgram, "save", half_written)


def blocks_miscounted(monkeypatch) -> None:
    """The real block-count refusal of deploy/int8.py (told a wrong MLP width, no block matches)."""
    quantize = export_module.quantize_int8

    def wrong_mlp_width(fp32, out, width, mlp_width):
        return quantize(fp32, out, width, mlp_width + 1)

    monkeypatch.setattr(export_module, "quantize_int8", wrong_mlp_width)


FAILURES = {
    "int8 step: disk full": (True, lambda m: quantizer_fails(m, OSError), OutputError),
    "int8 step: Ctrl-C": (True, lambda m: quantizer_fails(m, KeyboardInterrupt), KeyboardInterrupt),
    "int8 step: blocks miscounted": (True, blocks_miscounted, SettingError),
    "float32 graph with OUT.data: disk full": (False, lambda m: (external_data_limit(m), graph_save_fails(m)),
                                               OutputError),
}


@pytest.mark.slow
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_export_leaves_the_earlier_one_as_it_was(earlier, failure, tiny_checkpoint, monkeypatch):
    """Files, bytes and scores of the earlier export unchanged after the failure; nothing else beside
    them (the scratch folder is gone); a full disk is one line naming OUT and the fix."""
    int8, inject, expected = FAILURES[failure]
    before, scores = folder_contents(earlier.parent), outputs(earlier)
    inject(monkeypatch)
    with pytest.raises(expected) as caught:
        export_module.export_onnx(tiny_checkpoint, earlier, int8=int8)
    assert folder_contents(earlier.parent) == before
    for now, then in zip(outputs(earlier), scores):
        np.testing.assert_array_equal(now, then)
    if expected is OutputError:
        message = str(caught.value)
        assert caught.value.errno == errno.ENOSPC and "\n" not in message
        assert message.startswith(f"cannot write {earlier}: no space left on the device")
        assert "free space there or choose another output folder" in message
    if expected is SettingError:
        assert caught.value.field == "int8" and "export without int8" in str(caught.value)


@pytest.mark.slow
def test_the_command_line_says_a_full_disk_in_one_line(earlier, tiny_checkpoint, monkeypatch, capsys):
    """The reviewer's case on the command line: ``export --int8`` over an earlier export, the disk
    full in the int8 step: exit 2, one line naming the file and the fix, the earlier export kept."""
    from glocalclip.apps.cli import main

    before = folder_contents(earlier.parent)
    quantizer_fails(monkeypatch, OSError)
    assert main(["export", str(tiny_checkpoint), "--out", str(earlier), "--int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"glocalclip export: error: cannot write {earlier}: no space left on the device")
    assert folder_contents(earlier.parent) == before


@pytest.mark.slow
def test_a_new_export_replaces_the_earlier_one_whole(earlier, tiny_checkpoint, tiny_onnx, monkeypatch):
    """Over an earlier export of the other kind: a one-file export removes the earlier OUT.data (its
    graph would not read it), an export with OUT.data brings its own; each scores as the reference
    one-file export, and the folder holds nothing else."""
    had_data = (earlier.parent / "model.onnx.data").is_file()
    if not had_data:
        external_data_limit(monkeypatch)
    export_module.export_onnx(tiny_checkpoint, earlier)
    assert sorted(folder_contents(earlier.parent)) == (["model.onnx"] if had_data else
                                                       ["model.onnx", "model.onnx.data"])
    for now, want in zip(outputs(earlier), outputs(tiny_onnx)):
        np.testing.assert_array_equal(now, want)


@pytest.mark.slow
def test_ctrl_c_between_the_two_renames_waits_until_both_are_done(tiny_checkpoint, tmp_path, traced_once,
                                                                   monkeypatch):
    """SIGINT delivered right after OUT.data is renamed into place: OUT follows before the
    KeyboardInterrupt, so the new pair is whole (not the new weights beside an old graph)."""
    external_data_limit(monkeypatch)
    out = tmp_path / "model.onnx"
    export_module.export_onnx(tiny_checkpoint, out)  # an earlier pair
    replace, renamed = os.replace, []

    def then_ctrl_c(src, dst):
        replace(src, dst)
        if Path(dst).parent == tmp_path:  # not the writers' own renames in the scratch folder
            renamed.append(Path(dst).name)
            if len(renamed) == 1:
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(export_module.os, "replace", then_ctrl_c)
    # Ctrl-C's own handler: a run started in the background (a CI job, nohup) inherits SIGINT ignored
    ignored_or_not = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            export_module.export_onnx(tiny_checkpoint, out, sigma=1.0, threshold=0.5)
    finally:
        signal.signal(signal.SIGINT, ignored_or_not)
    assert renamed == ["model.onnx.data", "model.onnx"]
    assert OnnxPredictor(out).sigma == 1.0 and outputs(out)[0].shape == (2,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_an_export_refuses_a_folder_at_out_and_clears_a_killed_exports_scratch(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    """A folder named OUT: one message before any work (the checkpoint is never loaded). A scratch folder
    that a killed export left beside OUT (its process gone) is removed by the next export."""
    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(export_module, "load_model_and_checkpoint", never)
    (tmp_path / "model.onnx").mkdir()
    with pytest.raises(OutputError, match="a folder of that name is in the way") as caught:
        export_module.export_onnx(tiny_checkpoint, tmp_path / "model.onnx")
    assert caught.value.errno == errno.EISDIR
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f"glocalclip_export_{host_tag()}_{int(dead.stdout)}_0123abcd"
    (killed / "int8").mkdir(parents=True)
    (killed / "int8" / "fp32.onnx.data").write_bytes(b"\0" * 1000)
    with pytest.raises(AssertionError, match="the checkpoint was loaded"):
        export_module.export_onnx(tiny_checkpoint, tmp_path / "other.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.slow
def test_the_vision_tower_is_freed_before_quantization(tiny_checkpoint, tmp_path, traced_once, monkeypatch):
    """The quantizer holds the float32 graph and its int8 copy; the PyTorch model (~1.2 GB at ViT-L)
    must be gone by then: no name in export_onnx may keep its vision tower alive."""
    import gc
    import weakref

    load, quantize, tower = export_module.load_model_and_checkpoint, export_module.quantize_int8, []

    def remember_tower(*args, **kwargs):
        model, ckpt = load(*args, **kwargs)
        tower.append(weakref.ref(model.clip.visual))
        return model, ckpt

    def tower_gone_first(*args):
        gc.collect()
        assert tower[0]() is None, "the vision tower is still alive during quantization"
        return quantize(*args)

    monkeypatch.setattr(export_module, "load_model_and_checkpoint", remember_tower)
    monkeypatch.setattr(export_module, "quantize_int8", tower_gone_first)
    export_module.export_onnx(tiny_checkpoint, tmp_path / "int8.onnx", int8=True)
    assert OnnxPredictor(tmp_path / "int8.onnx").weights == "int8"
