"""Dataset generators (every layout of docs/design.md §7, the folder mode) and the reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from glocalclip.datasets import (
    DATASET_CLASSES, DATASET_METRICS, AnomalyDataset, DatasetError, load_meta, prepare_dataset,
)
from glocalclip.datasets.catalog import default_metrics, resolve_dataset_name

from fake_layouts import BUILDERS, Tree, build_mvtec, build_polyp, mvtec_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 32  # reader image size in these tests


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def check_dataset_items(root, meta, dataset, split="test"):
    """Every entry loads through AnomalyDataset with the right shapes, label and mask."""
    ds = AnomalyDataset(root, split=split, image_size=S, dataset=dataset)
    assert ds.classes == [c for c in DATASET_CLASSES[dataset] if meta[split].get(c)]
    assert ds.entries == [e for c in ds.classes for e in meta[split][c]]
    for i in range(len(ds)):
        item = ds[i]
        e = ds.entries[i]
        assert item["index"] == i and item["cls_name"] == e["cls_name"]
        assert item["img_path"] == os.path.join(str(root), *e["img_path"].split("/"))
        assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
        assert torch.isfinite(item["image"]).all()
        assert item["mask"].shape == (S, S) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["label"] == e["anomaly"]
        if e["anomaly"] and e["mask_path"]:
            assert item["has_mask"] is True and item["mask"].sum() > 0
        elif e["anomaly"]:
            assert item["has_mask"] is False and item["mask"].sum() == 0
        else:
            assert item["has_mask"] is True and item["mask"].sum() == 0
    return ds


# ---------------------------------------------------------------- every layout


@pytest.mark.parametrize("dataset", list(BUILDERS))
def test_layout_generator_and_reader(tmp_path, dataset, capsys):
    build, _ = BUILDERS[dataset]
    tree = build(tmp_path)
    meta = prepare_dataset(dataset, str(tmp_path))
    expected = tree.expected_meta()
    assert meta == expected  # counts, relative paths, labels, species, mask pairing, sorted order, splits
    with open(tmp_path / "meta.json") as f:
        assert json.load(f) == expected
    for split in ("train", "test"):
        for cls, entries in meta[split].items():
            paths = [e["img_path"] for e in entries]
            assert paths == sorted(paths)
            for e in entries:
                assert not os.path.isabs(e["img_path"]) and (tmp_path / e["img_path"]).is_file()
                if e["mask_path"]:
                    # paired by name: the mask's stem is the image's stem (+ a layout suffix)
                    assert _stem(e["mask_path"]).startswith(_stem(e["img_path"]))
                    assert _stem(e["mask_path"])[len(_stem(e["img_path"])):] in ("", "_mask", "_label",
                                                                                  "_Segmentation")
    out = capsys.readouterr().out
    assert "TOTAL" in out and "wrote" in out  # counts per class and split are printed
    for split in ("train", "test"):
        if meta[split]:
            check_dataset_items(tmp_path, meta, dataset, split)
    assert DATASET_METRICS[dataset] == PAPER_METRIC_MODES[dataset]


def test_every_script_names_a_known_dataset():
    scripts = sorted(f for f in os.listdir(os.path.join(REPO, "generate_dataset_json")) if f.endswith(".py"))
    wanted = {script for _, script in BUILDERS.values()} | {"folder"}
    assert {os.path.splitext(f)[0] for f in scripts} == wanted
    for f in scripts:
        with open(os.path.join(REPO, "generate_dataset_json", f)) as fh:
            text = fh.read()
        name = text.split('fixed_name="')[1].split('"')[0]
        stem = os.path.splitext(f)[0]
        assert name == "folder" if stem == "folder" else resolve_dataset_name(name) == name
        if stem != "folder":
            assert BUILDERS[name][1] == stem


def _run(args, cwd=REPO):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # the scripts must find the package on their own
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # the script in a subprocess
def test_script_subprocess_writes_meta(tmp_path):
    tree = BUILDERS["btad"][0](tmp_path)
    r = _run(["generate_dataset_json/btad.py", "--root", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert "TOTAL" in r.stdout
    with open(tmp_path / "meta.json") as f:
        assert json.load(f) == tree.expected_meta()


@pytest.mark.slow  # the script in a subprocess
def test_module_cli_dry_run_writes_nothing(tmp_path):
    build_polyp(tmp_path)
    r = _run(["-m", "glocalclip.datasets.prepare", "kvasir", "--root", str(tmp_path), "--dry-run"])
    assert r.returncode == 0, r.stderr
    assert "dry run" in r.stdout and "colon" in r.stdout
    assert not (tmp_path / "meta.json").exists()


@pytest.mark.slow  # the script in a subprocess
def test_script_refusal_exit_code_and_message(tmp_path):
    build_polyp(tmp_path)
    os.remove(tmp_path / "masks" / "10.png")
    r = _run(["generate_dataset_json/clinicdb.py", "--root", str(tmp_path)])
    assert r.returncode == 1
    assert "10.png" in r.stderr and "no mask" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "meta.json").exists()


# ---------------------------------------------------------------- refusals, nothing half-written


def _refused(tmp_path, name, *fragments, root=None):
    root = str(root or tmp_path)
    if os.path.isdir(root):
        with open(os.path.join(root, "meta.json"), "w") as f:
            f.write("OLD")
    with pytest.raises(DatasetError) as info:
        prepare_dataset(name, root, quiet=True)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, msg
    if os.path.isdir(root):
        with open(os.path.join(root, "meta.json")) as f:
            assert f.read() == "OLD"  # the previous file is untouched
        assert [n for n in os.listdir(root) if n.endswith(".tmp")] == []
    return msg


def test_refuses_missing_root(tmp_path):
    _refused(tmp_path, "mvtec", str(tmp_path / "nope"), "does not exist", root=tmp_path / "nope")


def test_refuses_missing_expected_folder(tmp_path):
    build_polyp(tmp_path)
    for f in os.listdir(tmp_path / "masks"):
        os.remove(tmp_path / "masks" / f)
    os.rmdir(tmp_path / "masks")
    _refused(tmp_path, "colondb", str(tmp_path / "masks"), "missing")


def test_refuses_missing_test_folder(tmp_path):
    build_mvtec(tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "zipper" / "test")
    _refused(tmp_path, "mvtec", str(tmp_path / "zipper" / "test"), "missing")


def test_refuses_anomalous_image_without_mask(tmp_path):
    build_mvtec(tmp_path)
    os.remove(tmp_path / "bottle" / "ground_truth" / "crack" / "10_mask.png")
    _refused(tmp_path, "mvtec", str(tmp_path / "bottle" / "test" / "crack" / "10.png"), "no mask")


def test_refuses_mask_without_image(tmp_path):
    build_mvtec(tmp_path, "mpdd")
    os.remove(tmp_path / "tubes" / "test" / "crack" / "2.png")
    _refused(tmp_path, "mpdd", str(tmp_path / "tubes" / "ground_truth" / "crack" / "2_mask.png"), "no anomalous image")


def test_refuses_mask_folder_of_unknown_specie(tmp_path):
    build_mvtec(tmp_path, "SDD")
    t = Tree(tmp_path)
    t.file("electrical commutators/ground_truth/dent/000_mask.png", mask=True)
    _refused(tmp_path, "SDD", "dent", "000_mask.png")


def test_refuses_unknown_class_folder(tmp_path):
    build_mvtec(tmp_path)
    os.makedirs(tmp_path / "bottles" / "test" / "good")
    msg = _refused(tmp_path, "mvtec", "bottles", "not classes of mvtec")
    assert "bottle, cable, capsule" in msg  # the expected names are listed


def test_refuses_missing_class_folder(tmp_path):
    BUILDERS["btad"][0](tmp_path)
    import shutil
    shutil.rmtree(tmp_path / "02")
    _refused(tmp_path, "btad", str(tmp_path / "02"), "missing", "01, 02, 03")


def test_refuses_dagm_label_without_image(tmp_path):
    BUILDERS["DAGM_KaggleUpload"][0](tmp_path)
    os.remove(tmp_path / "Class3" / "Test" / "0010.PNG")
    _refused(tmp_path, "dagm", "0010_label.PNG", "no image")


def test_refuses_visa_unknown_object_and_missing_mask(tmp_path):
    BUILDERS["visa"][0](tmp_path)
    os.remove(tmp_path / "pcb1" / "Data" / "Masks" / "Anomaly" / "001.png")
    _refused(tmp_path, "visa", "pcb1/Data/Masks/Anomaly/001.png".replace("/", os.sep), "does not exist")
    Tree(tmp_path).file("pcb1/Data/Masks/Anomaly/001.png", mask=True)
    prepare_dataset("visa", str(tmp_path), quiet=True)  # whole again
    with open(tmp_path / "split_csv" / "1cls.csv", "a") as f:
        f.write("pcb9,test,normal,pcb1/Data/Images/Normal/0000.JPG,\n")
    _refused(tmp_path, "visa", "pcb9", "pcb1, pcb2")


def test_refuses_unexpected_brain_folder_and_subfolders(tmp_path):
    BUILDERS["br35h"][0](tmp_path)
    Tree(tmp_path).file("br35/pred/p1.jpg")  # Br35H's unlabelled folder must not become "anomalous"
    _refused(tmp_path, "br35h", "pred", "no and yes")
    os.remove(tmp_path / "br35" / "pred" / "p1.jpg")
    os.rmdir(tmp_path / "br35" / "pred")
    Tree(tmp_path).file("br35/yes/more/y9.jpg")
    _refused(tmp_path, "br35h", str(tmp_path / "br35" / "yes" / "more"), "unexpected folder")


def test_refuses_unknown_dataset_name(tmp_path):
    with pytest.raises(DatasetError, match="valid names: mvtec, visa"):
        prepare_dataset("mvtex", str(tmp_path), quiet=True)


def test_write_is_atomic(tmp_path, monkeypatch):
    build_polyp(tmp_path)
    with open(tmp_path / "meta.json", "w") as f:
        f.write("OLD")
    import glocalclip.datasets.meta as meta_mod

    def broken_dump(obj, fh, **kw):
        fh.write('{"train": {')
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr(meta_mod.json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset("kvasir", str(tmp_path), quiet=True)
    assert (tmp_path / "meta.json").read_text() == "OLD"
    assert sorted(os.listdir(tmp_path)) == ["images", "masks", "meta.json"]


# ---------------------------------------------------------------- folder mode


def _folder_tree(root, masks=True, mask_names=("a_mask.png", "b10.png")):
    t = Tree(root)
    for n in ("n1.png", "n10.jpg", "n2.bmp"):
        t.file(f"data/ok/{n}")
    for n in ("a.png", "b10.png"):
        t.file(f"data/bad/{n}")
    if masks:
        for m in mask_names:
            t.file(f"data/gt/{m}", mask=True)
    return t


def test_folder_mode_with_masks(tmp_path):
    _folder_tree(tmp_path)
    meta = prepare_dataset("folder", str(tmp_path), class_name="widget", normal="data/ok",
                           abnormal=str(tmp_path / "data" / "bad"), masks="data/gt", quiet=True)
    assert meta["train"] == {}
    entries = meta["test"]["widget"]
    assert [(e["img_path"], e["mask_path"], e["anomaly"]) for e in entries] == [
        ("data/bad/a.png", "data/gt/a_mask.png", 1),
        ("data/bad/b10.png", "data/gt/b10.png", 1),
        ("data/ok/n1.png", "", 0),
        ("data/ok/n10.jpg", "", 0),
        ("data/ok/n2.bmp", "", 0),
    ]
    assert load_meta(str(tmp_path)) == meta
    ds = AnomalyDataset(tmp_path, image_size=S)  # no dataset: the classes come from meta.json
    assert ds.classes == ["widget"]
    items = [ds[i] for i in range(len(ds))]
    assert [it["has_mask"] for it in items] == [True] * 5
    assert all(it["mask"].sum() > 0 for it in items[:2])
    assert default_metrics(None, meta) == "image-pixel-level"


def test_folder_mode_without_masks(tmp_path):
    _folder_tree(tmp_path, masks=False)
    meta = prepare_dataset("folder", str(tmp_path), class_name="widget", normal="data/ok", abnormal="data/bad",
                           quiet=True)
    assert [e["mask_path"] for e in meta["test"]["widget"]] == [""] * 5
    ds = AnomalyDataset(str(tmp_path), image_size=S)
    items = [ds[i] for i in range(len(ds))]
    assert [(it["label"], it["has_mask"]) for it in items] == [(1, False), (1, False), (0, True), (0, True), (0, True)]
    assert all(it["mask"].sum() == 0 for it in items)
    assert default_metrics(None, meta) == "image-level"


@pytest.mark.slow  # the script in a subprocess
def test_folder_mode_script_and_refusals(tmp_path):
    _folder_tree(tmp_path, mask_names=("a.png", "b10_mask.png", "n1.png", "zzz.png"))
    args = ["generate_dataset_json/folder.py", "--root", str(tmp_path), "--normal", "data/ok", "--abnormal",
            "data/bad", "--masks", "data/gt", "--class-name", "widget"]
    r = _run(args)
    assert r.returncode == 1 and "zzz.png" in r.stderr  # a mask without an image (n1.png, a normal's, is fine)
    os.remove(tmp_path / "data" / "gt" / "zzz.png")
    r = _run(args)
    assert r.returncode == 0, r.stderr
    meta = load_meta(str(tmp_path))
    assert [e["mask_path"] for e in meta["test"]["widget"]][:2] == ["data/gt/a.png", "data/gt/b10_mask.png"]
    os.remove(tmp_path / "data" / "gt" / "a.png")
    with pytest.raises(DatasetError, match="no mask"):
        prepare_dataset("folder", str(tmp_path), class_name="w", normal="data/ok", abnormal="data/bad",
                        masks="data/gt", quiet=True)
    outside = tmp_path.parent / (tmp_path.name + "_outside")
    outside.mkdir()
    with pytest.raises(DatasetError, match="outside the root"):
        prepare_dataset("folder", str(tmp_path), class_name="w", normal=str(outside), quiet=True)
    with pytest.raises(DatasetError, match="does not exist"):
        prepare_dataset("folder", str(tmp_path), class_name="w", normal="data/missing", quiet=True)


# ---------------------------------------------------------------- the original code's meta.json


def _original_style(meta: dict, prefix: str) -> dict:
    """What the original scripts wrote: root-prefixed paths, listdir order, DAGM's Train/Test keys."""
    out = {}
    for split, classes in meta.items():
        out[split] = {c: [dict(e, img_path=prefix + e["img_path"],
                               mask_path=(prefix + e["mask_path"]) if e["mask_path"] else "")
                          for e in reversed(entries)] for c, entries in classes.items()}
    return out


@pytest.mark.parametrize("prefix_kind", ["absolute-moved", "root-name", "absolute-existing"])
def test_original_meta_with_root_prefixed_paths(tmp_path, prefix_kind):
    root = tmp_path / "mvtec"
    tree = mvtec_like(root, ("bottle", "cable"), with_train=True)
    expected = tree.expected_meta()
    prefix = {"absolute-moved": "/home/someone/GlocalCLIP/data/mvtec/", "root-name": "mvtec/",
              "absolute-existing": str(root) + "/"}[prefix_kind]
    with open(root / "meta.json", "w") as f:
        json.dump(_original_style(expected, prefix), f)
    meta = load_meta(str(root))
    for split in ("train", "test"):
        for cls in expected[split]:
            assert sorted(meta[split][cls], key=lambda e: e["img_path"]) == expected[split][cls]
    ds = AnomalyDataset(root, image_size=S, dataset="mvtec")
    assert ds.classes == ["bottle", "cable"]
    item = ds[0]
    assert os.path.isfile(item["img_path"]) and item["image"].shape == (3, S, S)


def test_original_dagm_meta_and_headct_style_entries(tmp_path):
    tree = BUILDERS["DAGM_KaggleUpload"][0](tmp_path)
    expected = tree.expected_meta()
    orig = {"Train": expected["train"], "Test": expected["test"]}
    orig["Test"]["Class1"][1]["anomaly"] = True  # JSON booleans are accepted as 0/1
    orig["Test"]["Class1"][1]["mask_path"] = ""  # an anomalous image without mask: has_mask False
    with open(tmp_path / "meta.json", "w") as f:
        json.dump(orig, f)
    meta = load_meta(str(tmp_path))
    assert set(meta) == {"train", "test"} and meta["test"]["Class1"][1]["anomaly"] == 1
    ds = AnomalyDataset(tmp_path, image_size=S, dataset="DAGM_KaggleUpload", classes=["Class1"])
    assert len(ds) == 3
    assert ds[1]["label"] == 1 and ds[1]["has_mask"] is False and ds[1]["mask"].sum() == 0


# ---------------------------------------------------------------- reader refusals


def test_reader_missing_meta_names_the_script(tmp_path):
    with pytest.raises(DatasetError, match=r"generate_dataset_json/btad.py --root"):
        AnomalyDataset(tmp_path, dataset="btad")
    with pytest.raises(DatasetError, match="folder.py"):
        load_meta(str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        load_meta(str(tmp_path / "nope"))


def test_reader_refusals(tmp_path):
    build_mvtec(tmp_path)
    prepare_dataset("mvtec", str(tmp_path), quiet=True)
    with pytest.raises(DatasetError, match="valid names"):
        AnomalyDataset(tmp_path, dataset="mvtecc")
    with pytest.raises(DatasetError, match="unknown class name.*'botle'.*valid: bottle, cable"):
        AnomalyDataset(tmp_path, dataset="mvtec", classes=["botle"])
    with pytest.raises(DatasetError, match="not classes of visa"):
        AnomalyDataset(tmp_path, dataset="visa")
    ds = AnomalyDataset(tmp_path, dataset="mvtec", classes="zipper", image_size=S)
    assert ds.classes == ["zipper"] and len(ds) == 6
    assert len(AnomalyDataset(tmp_path, split="train", dataset="mvtec")) == 30
    with pytest.raises(DatasetError, match="split must be"):
        AnomalyDataset(tmp_path, split="val")


def test_reader_empty_split(tmp_path):
    BUILDERS["headct"][0](tmp_path)
    prepare_dataset("headct", str(tmp_path), quiet=True)
    with pytest.raises(DatasetError, match="train split .* has no images"):
        AnomalyDataset(tmp_path, split="train", dataset="headct")


def test_reader_missing_undecodable_and_mis_sized_files(tmp_path):
    tree = build_polyp(tmp_path)
    prepare_dataset("kvasir", str(tmp_path), quiet=True)
    # an undecodable image: named at load time
    with open(tmp_path / "images" / "2.jpg", "wb") as f:
        f.write(b"not an image at all")
    ds = AnomalyDataset(tmp_path, image_size=S, dataset="kvasir")
    idx = [e["img_path"] for e in ds.entries].index("images/2.jpg")
    with pytest.raises(DatasetError, match=r"cannot decode image .*2\.jpg"):
        ds[idx]
    # a truncated PNG
    data = (tmp_path / "images" / "10.png").read_bytes()
    (tmp_path / "images" / "10.png").write_bytes(data[: len(data) // 2])
    idx = [e["img_path"] for e in ds.entries].index("images/10.png")
    with pytest.raises(DatasetError, match=r"10\.png"):
        ds[idx]
    # a mask whose size differs from its image
    tree.file("images/3.tif")
    from PIL import Image
    Image.new("L", (7, 5), 255).save(tmp_path / "masks" / "3.jpg")
    idx = [e["img_path"] for e in ds.entries].index("images/3.tif")
    with pytest.raises(DatasetError, match=r"mask .*3\.jpg is 7x5 but its image .*3\.tif is 20x16"):
        ds[idx]
    # a file listed in meta.json that does not exist: refused when the dataset is opened
    os.remove(tmp_path / "masks" / "1_mask.png")
    with pytest.raises(DatasetError, match=r"1 file\(s\) listed .* do not exist: .*1_mask\.png"):
        AnomalyDataset(tmp_path, image_size=S, dataset="kvasir")


# docs/design.md §6, written out: image+pixel for MVTec, VisA, MPDD, BTAD, SDD, DTD-Synthetic; image only for
# HeadCT, BrainMRI, Br35H; pixel only for ISIC, ColonDB, ClinicDB, Kvasir, Endo, TN3K (DAGM and COVID-19
# are our extras: DAGM has masks, COVID-19 has none)
PAPER_METRIC_MODES = {
    "mvtec": "image-pixel-level", "visa": "image-pixel-level", "mpdd": "image-pixel-level",
    "btad": "image-pixel-level", "SDD": "image-pixel-level", "DTD": "image-pixel-level",
    "headct": "image-level", "brain_mri": "image-level", "br35h": "image-level",
    "ISIC": "pixel-level", "colondb": "pixel-level", "clinicdb": "pixel-level", "kvasir": "pixel-level",
    "endo": "pixel-level", "tn3k": "pixel-level",
    "DAGM_KaggleUpload": "image-pixel-level", "covid19": "image-level",
}


def test_catalog():
    assert set(DATASET_CLASSES) == set(DATASET_METRICS) == set(BUILDERS)
    assert DATASET_METRICS == PAPER_METRIC_MODES
    assert all(default_metrics(name) == mode for name, mode in PAPER_METRIC_MODES.items())
    assert DATASET_CLASSES["SDD"] == ("electrical commutators",)
    assert DATASET_METRICS["DAGM_KaggleUpload"] == "image-pixel-level"
    assert DATASET_METRICS["covid19"] == "image-level" and DATASET_METRICS["tn3k"] == "pixel-level"
    assert resolve_dataset_name("dagm") == "DAGM_KaggleUpload" and resolve_dataset_name("sdd") == "SDD"
    assert default_metrics("isic") == "pixel-level"


# ---------------------------------------------------------------- image inputs (predict's and --reference's)
def test_image_inputs_expand_folders_globs_and_files_once(tmp_path, monkeypatch):
    from pathlib import Path

    from glocalclip.datasets.scan import NO_IMAGES, NO_SUCH_PATH, expand_image_inputs
    from glocalclip.engine.few_shot import reference_files

    for rel in ("a/z.png", "a/sub/b.JPG", "a/sub/deeper/c.tif", "a/notes.txt", "d/x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    folder = ["a/sub/b.JPG", "a/sub/deeper/c.tif", "a/z.png"]  # recursive, sorted by path, no notes.txt
    files, missing = expand_image_inputs(["a"])
    assert [f.as_posix() for f in files] == folder and missing == []
    # a glob matching a folder searches it; a file is taken as given, whatever its extension; repeats
    # (also through another spelling of the same path) are kept once, at their first place
    files, missing = expand_image_inputs(["d/*", "a/notes.txt", "a/*/", "./d/x.png", "gone.png", "empty", "a/*.gif"])
    assert [f.as_posix() for f in files] == ["d/x.png", "a/notes.txt", "a/sub/b.JPG", "a/sub/deeper/c.tif"]
    assert missing == [("gone.png", NO_SUCH_PATH), ("empty", NO_IMAGES), ("a/*.gif", NO_IMAGES)]
    # few-shot's --reference reads one input the same way, as absolute paths, and refuses an empty one
    assert reference_files("a") == [Path(tmp_path / f) for f in folder]
    assert reference_files("a/**/*.png") == [Path(tmp_path / "a/z.png")]
    with pytest.raises(FileNotFoundError, match=f"--reference gone.png: {NO_SUCH_PATH}; give --reference a folder"):
        reference_files("gone.png")
    with pytest.raises(DatasetError, match=f"--reference a/\\*.gif: {NO_IMAGES}; give --reference a folder"):
        reference_files("a/*.gif")
