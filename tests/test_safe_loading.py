"""Loading runs no code and refuses damaged files (issue 17, docs/usage.md "Security: files you load").

The attacks are real: a checkpoint-shaped pickle whose unpickling runs ``os.system("touch MARKER")``,
given to every command and API that loads a checkpoint; a checkpoint with 64 bytes flipped inside a
tensor's storage in its zip; random bytes as an ONNX file; a TorchScript archive OpenAI never
published. Each test checks the side effect did not happen (or, with the opt-in, that it did: the
refusal is not an accident of a broken file).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from glocalclip import GlocalCLIP, load_model
from glocalclip.apps import cli  # its test_main / test_parser would be collected as tests if imported
from glocalclip.apps.cli import run_command, train_main, train_parser
from glocalclip.apps.convert import convert_checkpoint, convert_main, convert_parser
from glocalclip.inference.predictor import Predictor
from glocalclip.apps.predict_cli import predict_main, predict_parser
from glocalclip.apps.report import report_main, report_parser
from glocalclip.model.checkpoint_format import (INTEGRITY_KEY, CheckpointError, make_checkpoint, payload_sha256,
                                                read_checkpoint)
from glocalclip.model.config import TRUST_FLAG

from conftest import create_backbone, randomise_prompts, tiny_config
from test_io_errors import _error_line, _test_args, _train_args, data, reference  # noqa: F401 - fixtures

REFUSED = "refused: it holds Python objects beyond tensors and plain values"


class RunsShell:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint does with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def malicious_copy(good: Path, path: Path, marker: Path, legacy: bool = False) -> Path:
    """``good``'s checkpoint dict with a payload entry (and no integrity hash, as an attacker leaves
    it), saved with torch.save: shaped like a checkpoint, and it loads into a model once unpickled."""
    ckpt = torch.load(good, weights_only=True)
    ckpt.pop(INTEGRITY_KEY)
    ckpt["notes"] = RunsShell(marker)
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture()
def evil(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    return malicious_copy(tiny_checkpoint, tmp_path / "evil.pth", marker), marker


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image
    import numpy as np

    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


def _refusal(line: str, ckpt: Path) -> None:
    assert f"checkpoint {ckpt} {REFUSED}" in line and "GLOBAL posix.system" in line and TRUST_FLAG in line, line


# ---------------------------------------------------------------------------- a malicious pickle, every way in
def _serve_main(argv):
    """serve's command line up to the point where it would start answering (uvicorn.run records the app
    instead of serving forever): the predictor is built, or refused, as on a real start."""
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from glocalclip.apps.serve_cli import serve_main

    started = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
        rc = serve_main(argv)
    assert rc != 0 or len(started) == 1
    return rc


def _export_main(argv):
    pytest.importorskip("onnxscript")
    from glocalclip.apps.export_cli import export_main

    return export_main(argv)


COMMANDS = {  # name: (prog, main, argv from (checkpoint, tmp_path, data, image))
    "predict --checkpoint": ("glocalclip predict", predict_main, lambda c, t, d, i: [
        str(i), "--checkpoint", str(c), "--out", str(t / "out"), "--device", "cpu", "--no_progress"]),
    "serve --checkpoint": ("glocalclip serve", _serve_main, lambda c, t, d, i: ["--checkpoint", str(c), "--device", "cpu"]),
    "export": ("glocalclip export", _export_main, lambda c, t, d, i: [str(c), "--out", str(t / "x.onnx")]),
    "test.py": ("test.py", cli.test_main, lambda c, t, d, i: _test_args(d, c, t / "res")),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_malicious_checkpoint_is_refused_by_every_command(command, evil, tmp_path, data, image, capsys):  # noqa: F811
    ckpt, marker = evil
    prog, main, argv = COMMANDS[command]
    assert run_command(prog, main, argv(ckpt, tmp_path, data, image)) == 2
    _refusal(_error_line(capsys), ckpt)
    assert not marker.exists()


def test_a_malicious_checkpoint_is_refused_by_convert(evil, tmp_path, capsys):
    ckpt, marker = evil
    assert convert_main([str(ckpt), str(tmp_path / "new.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert: ")
    _refusal(err[0], ckpt)
    assert not marker.exists() and not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("named", ["folder", "file"])
def test_a_malicious_checkpoint_is_refused_by_train_resume(named, evil, tmp_path, data, capsys):  # noqa: F811
    """In a folder it is not passed over for an earlier epoch, as a damaged one is: the run stops on it."""
    ckpt, marker = evil
    save = tmp_path / "run"
    save.mkdir()
    shutil.copy(ckpt, save / "epoch_1.pth")
    resume = save if named == "folder" else save / "epoch_1.pth"
    assert run_command("train.py", train_main, _train_args(data, save, "--epoch", "2", "--resume", str(resume))) == 2
    _refusal(_error_line(capsys), save / "epoch_1.pth")
    assert not marker.exists() and sorted(p.name for p in save.iterdir()) == ["epoch_1.pth"]


def test_a_malicious_checkpoint_named_in_results_json_is_refused_by_report(evil, tmp_path, capsys):
    ckpt, marker = evil
    run = tmp_path / "runs" / "seed1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"dataset": "mvtec", "mean": {}, "classes": {},
                                                  "checkpoint": str(ckpt)}))
    assert report_main([str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report: ")
    _refusal(err[0], ckpt)
    assert not marker.exists()


API = {
    "Predictor.from_checkpoint": lambda c: Predictor.from_checkpoint(c, device="cpu"),
    "load_model": lambda c: load_model(c),
    "GlocalCLIP.from_checkpoint": lambda c: GlocalCLIP.from_checkpoint(c),
    "GlocalCLIP.load_prompts": lambda c: GlocalCLIP(tiny_config()).load_prompts(c),
    "convert_checkpoint": lambda c: convert_checkpoint(c, {}),
    "read_checkpoint": read_checkpoint,
}


@pytest.mark.parametrize("entry", list(API))
def test_a_malicious_checkpoint_is_refused_by_the_python_api(entry, evil):
    ckpt, marker = evil
    with pytest.raises(CheckpointError, match=REFUSED) as raised:
        API[entry](ckpt)
    assert raised.value.kind == "unsafe" and "trust=True" in str(raised.value)
    assert not marker.exists()


def test_the_legacy_pickle_format_is_refused_too(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = malicious_copy(tiny_checkpoint, tmp_path / "old.pth", marker, legacy=True)
    assert not zipfile.is_zipfile(ckpt)
    with pytest.raises(CheckpointError, match=REFUSED):
        load_model(ckpt)
    assert not marker.exists()


def test_the_opt_in_loads_it_and_runs_its_code(evil, tmp_path, image):
    """--trust_checkpoint (trust=True) is what loads such a file: the payload runs, and the model scores."""
    ckpt, marker = evil
    out = tmp_path / "out"
    assert run_command("glocalclip predict", predict_main, [str(image), "--checkpoint", str(ckpt), "--out", str(out),
                                                            "--device", "cpu", "--no_progress", TRUST_FLAG]) == 0
    assert marker.exists() and (out / "predictions.csv").is_file()
    marker.unlink()
    model = load_model(ckpt, trust=True)
    assert marker.exists() and model.cfg == tiny_config()
    marker.unlink()  # convert it once, trusted: what convert writes loads safely, serve included
    assert convert_main([str(ckpt), str(tmp_path / "clean.pt"), TRUST_FLAG]) == 0 and marker.exists()
    marker.unlink()
    clean = read_checkpoint(tmp_path / "clean.pt")
    assert "notes" not in clean and clean[INTEGRITY_KEY] == payload_sha256(clean) and not marker.exists()


def test_every_command_that_loads_a_checkpoint_has_the_opt_in():
    from glocalclip.apps.parsers import export_parser

    from glocalclip.apps.serve_cli import serve_parser

    for parser in (train_parser(), cli.test_parser(), predict_parser(), convert_parser(), export_parser(), report_parser(),
                   serve_parser()):
        action = parser._option_string_actions.get(TRUST_FLAG)  # argparse's table of flags
        assert action is not None and action.default is False and action.nargs == 0, parser.prog  # never the default
        assert "run any code" in action.help and TRUST_FLAG in parser.format_help()


@pytest.mark.slow  # a real process, as a user runs it
def test_a_malicious_checkpoint_through_the_console_command(evil, tmp_path, image):
    ckpt, marker = evil
    out = subprocess.run([sys.executable, "-m", "glocalclip", "predict", str(image), "--checkpoint", str(ckpt),
                          "--out", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    _refusal(out.stderr, ckpt)
    assert not marker.exists()


# ---------------------------------------------------------------------------- TorchScript --pretrained
@pytest.fixture()
def unknown_archive(tmp_path) -> Path:
    """The tiny backbone as a TorchScript archive: OpenAI's format, but not a file OpenAI published."""
    torch.manual_seed(3)
    src = create_backbone("tiny", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates TorchScript
        path = tmp_path / "ViT-L-14-336px.pt"
        torch.jit.script(src).save(str(path))
    return path


def test_an_unknown_torchscript_archive_is_refused_without_the_opt_in(unknown_archive, tmp_path, data, capsys):  # noqa: F811
    with pytest.raises(CheckpointError, match="TorchScript archive") as raised:
        create_backbone("tiny", str(unknown_archive))
    assert raised.value.kind == "unsafe" and TRUST_FLAG in str(raised.value)
    flags = _train_args(data, tmp_path / "run")
    flags[flags.index("--pretrained") + 1] = str(unknown_archive)
    assert run_command("train.py", train_main, flags) == 2
    line = _error_line(capsys)
    assert f"pretrained weights file {unknown_archive} refused: it is a TorchScript archive" in line
    assert TRUST_FLAG in line and not (tmp_path / "run" / "epoch_1.pth").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trusted = create_backbone("tiny", str(unknown_archive), trust=True)
    torch.manual_seed(3)
    assert torch.equal(trusted.visual.proj, create_backbone("tiny", None).visual.proj)


def test_a_malicious_pretrained_state_dict_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pt"
    torch.save({**create_backbone("tiny", None).state_dict(), "x": RunsShell(marker)}, weights)
    with pytest.raises(CheckpointError, match=f"pretrained weights file {weights} {REFUSED}"):
        GlocalCLIP(tiny_config(pretrained=str(weights)))
    assert not marker.exists()


# ---------------------------------------------------------------------------- integrity
def storage_span(path: Path, index: int) -> tuple[int, int]:
    """(offset, size) in the file of the bytes of ``data/<index>``, a tensor storage of torch.save's zip
    (stored, not compressed): after the entry's local header (30 bytes, its name and its extra field)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(f"/data/{index}"))
    assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bytes(path: Path, index: int, n: int = 64) -> None:
    offset, size = storage_span(path, index)
    assert size >= n
    raw = bytearray(path.read_bytes())
    start = offset + (size - n) // 2
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    path.write_bytes(bytes(raw))


@pytest.fixture()
def sealed(tiny_clip, tmp_path) -> Path:
    """One of our checkpoints with prompts and an Adam state, as train.py writes it."""
    model = randomise_prompts(GlocalCLIP(tiny_config(), clip=tiny_clip), 4)
    opt = torch.optim.Adam(model.prompt_parameters(), lr=1e-3, betas=(0.5, 0.999))
    sum(p.square().sum() for p in model.prompt_parameters()).backward()
    opt.step()
    path = tmp_path / "epoch_1.pth"
    torch.save(model.checkpoint(1, opt.state_dict(), train_config={"seed": 111}), path)
    return path


@pytest.mark.parametrize("storage", ["first", "last"])  # a prompt context; an Adam moment
def test_a_checkpoint_with_flipped_bytes_is_refused(sealed, storage, image, tmp_path, capsys):
    before = torch.load(sealed, weights_only=True)
    with zipfile.ZipFile(sealed) as zf:
        count = sum("/data/" in n and "/.data/" not in n for n in zf.namelist())
    index = 0 if storage == "first" else count - 1
    if storage == "last":  # the last storage is a moment of the Adam state, not the step count (4 bytes)
        index = max(i for i in range(count) if storage_span(sealed, i)[1] >= 64)
    flip_bytes(sealed, index)
    after = torch.load(sealed, weights_only=True)  # torch itself notices nothing
    assert payload_sha256(after) != after[INTEGRITY_KEY] == before[INTEGRITY_KEY]
    with pytest.raises(CheckpointError, match=f"checkpoint {sealed} is damaged") as raised:
        read_checkpoint(sealed)
    assert raised.value.kind == "corrupt"
    with pytest.raises(CheckpointError, match="is damaged"):
        read_checkpoint(sealed, trust=True)  # trust is about code, not about damage
    assert run_command("glocalclip predict", predict_main, [str(image), "--checkpoint", str(sealed), "--out",
                                                            str(tmp_path / "out"), "--device", "cpu", "--no_progress"]) == 2
    assert f"checkpoint {sealed} is damaged" in _error_line(capsys)


def test_what_the_seal_covers(sealed, tmp_path):
    """Every tensor and plain value but the seal itself, in a fixed order: a save and load keep it; a
    changed prompt value, epoch or config field changes it; checkpoints without one still load."""
    ckpt = torch.load(sealed, weights_only=True)
    assert payload_sha256(ckpt) == ckpt[INTEGRITY_KEY] and len(ckpt[INTEGRITY_KEY]) == 64
    for change in (lambda c: c["prompt_learner"]["ctx_global_pos"].view(-1)[0].add_(1e-7),
                   lambda c: c.__setitem__("epoch", 2), lambda c: c["config"].__setitem__("n_ctx", 6),
                   lambda c: c["optimizer"]["param_groups"][0].__setitem__("lr", 0.002)):
        other = torch.load(sealed, weights_only=True)
        change(other)
        assert payload_sha256(other) != ckpt[INTEGRITY_KEY]
    ckpt.pop(INTEGRITY_KEY)
    torch.save(ckpt, tmp_path / "older.pth")  # as versions before the seal wrote them
    assert read_checkpoint(tmp_path / "older.pth")["epoch"] == 1


def test_checkpoints_hold_only_plain_values(tmp_path):
    """A path, numpy numbers and arrays become text, numbers and tensors, so the file loads safely;
    another object is the writer's bug, refused before anything is written."""
    import numpy as np

    ckpt = make_checkpoint({"n_ctx": 5}, {"ctx": torch.ones(2, 3)}, np.int64(3), None, data_path=Path("/x/y"),
                           losses={"total": np.float64(0.5)}, table=np.arange(3), pair=(1, np.float32(2.5)))
    torch.save(ckpt, tmp_path / "c.pth")
    back = torch.load(tmp_path / "c.pth", weights_only=True)
    assert back["data_path"] == "/x/y" and type(back["losses"]["total"]) is float and back["epoch"] == 3
    assert torch.equal(back["table"], torch.arange(3)) and back["pair"] == (1, 2.5)
    assert payload_sha256(back) == back[INTEGRITY_KEY]
    with pytest.raises(TypeError, match=r"checkpoint\['odd'\] holds a object"):
        make_checkpoint({}, {}, 0, None, odd=object())


@pytest.mark.slow  # train.py: a 3-epoch reference run and a resumed one
def test_resume_passes_over_a_checkpoint_with_flipped_bytes(data, reference, tmp_path):  # noqa: F811
    """epoch_2.pth with 64 bytes flipped in a prompt tensor: --resume DIR continues from epoch_1.pth,
    says so, and ends with the uninterrupted run's prompts (today: it continued from the damaged prompts)."""
    save = tmp_path / "ck"
    save.mkdir()
    for n in (1, 2):
        shutil.copy(reference / f"epoch_{n}.pth", save)
    flip_bytes(save / "epoch_2.pth", 0)
    assert run_command("train.py", train_main, _train_args(data, save, "--epoch", "3", "--resume", str(save))) == 0
    log = (save / "log.txt").read_text()
    assert f"passing over a damaged checkpoint: checkpoint {save / 'epoch_2.pth'} is damaged" in log
    assert f"continuing from {save / 'epoch_1.pth'}" in log and "epochs 2..3" in log
    ref, got = (torch.load(p / "epoch_3.pth", weights_only=True) for p in (reference, save))
    assert got[INTEGRITY_KEY] == payload_sha256(got)
    for k in ref["prompt_learner"]:
        assert torch.equal(ref["prompt_learner"][k], got["prompt_learner"][k]), k


# ---------------------------------------------------------------------------- a bad ONNX file
@pytest.mark.parametrize("kind", ["random", "empty"])
def test_a_bad_onnx_file_is_one_message_and_exit_2(kind, image, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from glocalclip.deploy.runtime import OnnxFileError, OnnxPredictor

    bad = tmp_path / "model.onnx"
    bad.write_bytes(os.urandom(4096) if kind == "random" else b"")
    assert run_command("glocalclip predict", predict_main, [str(image), "--model", str(bad), "--out",
                                                            str(tmp_path / "out"), "--no_progress"]) == 2
    line = _error_line(capsys)
    assert f"ONNX file {bad} cannot be read by ONNX Runtime" in line and "glocalclip export" in line
    with pytest.raises(OnnxFileError, match="cannot be read"):
        OnnxPredictor(bad)
    if kind == "random":
        assert run_command("glocalclip serve", _serve_main, ["--model", str(bad)]) == 2
        assert f"ONNX file {bad} cannot be read" in _error_line(capsys)
