"""What a newcomer's install meets: a torch/torchvision pair that does not belong together gets one
message, and the torch-free runtime install (README, "Deploy") scores images with `predict --model`."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _fake_torchvision(root: Path, error: str) -> Path:
    """A torchvision package whose import fails as one built for another torch does."""
    pkg = root / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"raise RuntimeError({error!r})\n")
    return root


@pytest.mark.parametrize("code", ["from glocalclip import GlocalCLIP",
                                  "import glocalclip.model.backbone",
                                  "from glocalclip import load_model"])
def test_a_torchvision_built_for_another_torch_gets_one_message(tmp_path, code):
    fake = _fake_torchvision(tmp_path / "site", "operator torchvision::nms does not exist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("glocalclip.model.clip_import.TorchInstallMismatch: torchvision ")
    assert "does not work with torch" in last and "operator torchvision::nms does not exist" in last
    assert "pip install torch==2.14.1 torchvision==0.29.1" in last
    assert proc.stderr.count("Traceback") == 1 and "During handling" not in proc.stderr  # no chain


def test_a_missing_torchvision_is_not_called_a_mismatch(tmp_path, monkeypatch):
    from glocalclip.model import clip_import

    real = clip_import.importlib.import_module

    def without_torchvision(name, *a):
        if name == "torchvision":
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
        return real(name, *a)

    monkeypatch.setattr(clip_import.importlib, "import_module", without_torchvision)
    with pytest.raises(ModuleNotFoundError) as err:
        clip_import.import_open_clip()
    assert not isinstance(err.value, clip_import.TorchInstallMismatch)


# ---------------------------------------------------------------------------- the torch-free runtime install
RUNTIME_PACKAGES = ("numpy", "pillow", "onnxruntime")  # README: the one line of the torch-free install


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory) -> Path:
    """A fresh venv with the README's torch-free line: the package without dependencies, plus numpy,
    Pillow and onnxruntime, nothing else (pip takes the wheels from its cache or the local index).
    They come in the versions this process runs, as the scores are compared with its own runtime's:
    Pillow's bicubic resize moved between releases (9.3 and 13.0 differ by up to 5 levels), and under
    the lowest bounds (ci/lowest-constraints.txt) this tests the torch-free install at those bounds too."""
    venv = tmp_path_factory.mktemp("runtime") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    runtime = [f"{name}=={version(name)}" for name in RUNTIME_PACKAGES]
    for args in (runtime, ["--no-deps", str(REPO)]):
        proc = subprocess.run(pip + args, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"pip install {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return py


@pytest.mark.slow  # a venv and three wheels (about half a minute from pip's cache)
def test_the_torch_free_install_runs_predict_model(runtime_venv, tiny_onnx, deploy_images, tmp_path):
    py = runtime_venv
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv's own copy of the package
    missing = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    for absent in ("tqdm", "cv2", "scipy", "open_clip"):  # nothing else came with it
        assert subprocess.run([str(py), "-c", f"import {absent}"], capture_output=True, env=env).returncode != 0
    out = tmp_path / "pred"
    glocalclip = py.parent / "glocalclip"
    t0 = time.time()
    proc = subprocess.run([str(glocalclip), "predict", "--model", str(tiny_onnx), *map(str, deploy_images),
                           "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"predict: {len(deploy_images)} scored" in proc.stdout, time.time() - t0
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["image_path"] for r in rows] == list(map(str, deploy_images))
    from PIL import Image

    from glocalclip.deploy import OnnxPredictor

    want = OnnxPredictor(tiny_onnx).predict([str(p) for p in deploy_images])  # this env's runtime, same file
    for row, w, image in zip(rows, want, deploy_images):
        assert float(row["pred_score"]) == pytest.approx(w.pred_score, abs=1e-5)
        amap = np.load(row["anomaly_map"])
        assert amap.shape == w.anomaly_map.shape == Image.open(image).size[::-1]
        with Image.open(row["overlay"]) as overlay:  # drawn with Pillow: the image's size, colour bar inside
            assert overlay.size == Image.open(image).size
    # the library API there too
    api = subprocess.run([str(py), "-c", "import json, sys; from glocalclip import OnnxPredictor; "
                          "p = OnnxPredictor(sys.argv[1]).predict(sys.argv[2]); "
                          "print(json.dumps([p.pred_score, list(p.anomaly_map.shape), 'torch' in sys.modules]))",
                          str(tiny_onnx), str(deploy_images[0])], capture_output=True, text=True, env=env, timeout=120)
    assert api.returncode == 0, api.stderr
    score, shape, torch_loaded = json.loads(api.stdout.strip().splitlines()[-1])
    assert score == pytest.approx(want[0].pred_score, abs=1e-5) and shape == list(want[0].anomaly_map.shape)
    assert torch_loaded is False


@pytest.mark.slow  # the venv above, one more file
def test_the_torch_free_install_runs_an_int8_export(runtime_venv, tiny_int8_onnx, deploy_images):
    """``export --int8``'s operators (MatMulInteger, DynamicQuantizeLinear) are in the plain onnxruntime
    package: the file scores there as here, with neither torch nor onnx importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util, json, sys; from glocalclip import OnnxPredictor; "
            "p = OnnxPredictor(sys.argv[1]); ps = p.predict(sys.argv[2:]); "
            "print(json.dumps([p.weights, [x.pred_score for x in ps], "
            "[bool(importlib.util.find_spec(m)) for m in ('torch', 'onnx')]]))")
    proc = subprocess.run([str(runtime_venv), "-c", code, str(tiny_int8_onnx), *map(str, deploy_images)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    weights, scores, importable = json.loads(proc.stdout.strip().splitlines()[-1])
    from glocalclip.deploy import OnnxPredictor

    want = OnnxPredictor(tiny_int8_onnx).predict([str(p) for p in deploy_images])
    assert weights == "int8" and importable == [False, False]
    assert scores == pytest.approx([w.pred_score for w in want], abs=1e-5)


# ---------------------------------------------------------------------------- a failed command leaves no empty folder
def test_a_failed_train_leaves_no_empty_save_folder(tmp_path, monkeypatch, capsys):
    """The real offline-weights error (no CLIP weights can be had here): runs/x/ is created early, to
    fail at once on a folder that cannot take a file, and removed again with its new parent."""
    from glocalclip.apps.cli import run_command, train_main
    from glocalclip.datasets.synthetic import make_synthetic_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = make_synthetic_dataset(tmp_path / "data", n_train=1, n_test_good=2, n_test_defect=2, size=32, seed=0)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert run_command("train.py", train_main, ["--train_data_path", str(data), "--save_path", "runs/x"]) == 2
    assert "cannot get the 'openai' weights" in capsys.readouterr().err
    assert list(work.iterdir()) == []  # neither runs/x nor runs
    # a folder that was there before stays, and so does one that holds anything
    (work / "kept").mkdir()
    assert run_command("train.py", train_main, ["--train_data_path", str(data), "--save_path", "kept"]) == 2
    assert (work / "kept").is_dir()


def test_a_failed_predict_leaves_no_empty_out_folder(tmp_path, monkeypatch, capsys, deploy_images):
    from glocalclip.apps.cli import main

    monkeypatch.chdir(tmp_path)
    image = str(deploy_images[0])
    assert main(["predict", image]) == 2  # no model given
    assert "give the model to score with" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", "missing.pth", image]) == 2  # the lock was taken, then the model failed
    assert "missing.pth does not exist" in capsys.readouterr().err
    assert main(["predict", "--model", "missing.onnx", image, "--out", "deep/er/preds"]) == 2
    assert list(tmp_path.iterdir()) == []  # neither ./predictions nor deep/er/preds


def test_a_failed_test_leaves_no_empty_save_folder(tmp_path, monkeypatch, capsys):
    """test.py prepares --save_path before the weights load; a checkpoint that does not exist then
    fails the run, and the folders it made (results/x and results) go again."""
    from glocalclip.apps.cli import run_command, test_main
    from glocalclip.datasets.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n_train=1, n_test_good=2, n_test_defect=2, size=32, seed=0)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    argv = ["--data_path", str(data), "--checkpoint_path", "missing.pth", "--save_path", "results/x"]
    assert run_command("test.py", test_main, argv) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert list(work.iterdir()) == []
