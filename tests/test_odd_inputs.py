"""Odd inputs: EXIF-rotated photos (predict and folder-mode data turn them, named datasets do not),
image sizes that are not a whole number of patches, folder data with some masks missing, and the
messages about undecodable inputs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from glocalclip.settings import SettingError
import torch
from PIL import Image, ImageOps

from glocalclip import GlocalCLIP, Predictor
from glocalclip.datasets import AnomalyDataset, DatasetError, prepare_dataset
from glocalclip.datasets.preprocess import image_to_uint8, load_mask

from conftest import tiny_config
from fake_layouts import Tree

STORED = (32, 64)  # (h, w) of the pixels in the file: landscape
SHOWN = (64, 32)   # (h, w) as viewers show it with EXIF orientation 6 (rotate 90° clockwise)


def _sideways_jpeg(path) -> None:
    """A JPEG stored landscape with EXIF orientation 6, as phones save a portrait photo."""
    h, w = STORED
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (30, 60, 200)  # left half blue, right half orange: a turn changes the pixels
    arr[:, w // 2:] = (230, 140, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(path, exif=exif, quality=95)


def _shown(path) -> Image.Image:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im)


def test_predict_maps_line_up_with_the_photo_as_shown(tiny_model, tmp_path):
    photo = tmp_path / "phone.jpg"
    _sideways_jpeg(photo)
    pred = Predictor(tiny_model, device="cpu", batch_size=2)
    from_file = pred.predict(str(photo))
    assert from_file.anomaly_map.shape == SHOWN
    upright = np.asarray(_shown(photo))
    assert upright.shape[:2] == SHOWN
    from_pixels = pred.predict(upright)
    assert from_file.pred_score == from_pixels.pred_score
    np.testing.assert_array_equal(from_file.anomaly_map, from_pixels.anomaly_map)
    with Image.open(photo) as im:  # an opened PIL image is turned too
        assert pred.predict(im).anomaly_map.shape == SHOWN


def _one_entry_dataset(root, mask_size) -> None:
    """meta.json with one anomalous sideways photo of class 'bottle' and a mask of ``mask_size`` (w, h)."""
    _sideways_jpeg(root / "photo.jpg")
    mask = np.zeros(mask_size[::-1], np.uint8)
    mask[: mask_size[1] // 2] = 255  # the top half (as shown) is the defect
    Image.fromarray(mask).save(root / "mask.png")
    entry = {"img_path": "photo.jpg", "mask_path": "mask.png", "cls_name": "bottle", "specie_name": "x", "anomaly": 1}
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"bottle": [entry]}}))


def test_folder_mode_data_is_read_as_shown_named_datasets_as_stored(tmp_path):
    S = 28
    _one_entry_dataset(tmp_path, mask_size=(SHOWN[1], SHOWN[0]))  # drawn over the photo as shown
    item = AnomalyDataset(tmp_path, image_size=S, as_uint8=True)[0]  # no --dataset: folder mode
    assert torch.equal(item["image"], image_to_uint8(_shown(tmp_path / "photo.jpg"), S))
    assert torch.equal(item["mask"], load_mask(str(tmp_path / "mask.png"), S).to(torch.uint8))
    named = AnomalyDataset(tmp_path, image_size=S, as_uint8=True, dataset="mvtec")
    assert not named.upright
    with pytest.raises(DatasetError, match="mask .*mask.png is 32x64 but its image .*photo.jpg is 64x32"):
        named[0]  # as the original code read it: the file's own orientation


def test_named_datasets_keep_the_stored_orientation(tmp_path):
    S = 28
    _one_entry_dataset(tmp_path, mask_size=(STORED[1], STORED[0]))
    item = AnomalyDataset(tmp_path, image_size=S, as_uint8=True, dataset="mvtec")[0]
    with Image.open(tmp_path / "photo.jpg") as stored:
        assert torch.equal(item["image"], image_to_uint8(stored, S))
    assert not torch.equal(item["image"], image_to_uint8(_shown(tmp_path / "photo.jpg"), S))


def test_an_image_size_that_is_not_whole_patches_is_refused_with_the_nearest(tiny_clip, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the backbone was built before the size was checked")

    monkeypatch.setattr("glocalclip.model.backbone_record.BackboneRecord.build", no_weights)
    with pytest.raises(SettingError, match=r"^image_size 100 is not a multiple of the patch size 14 .*use 98 or 112") as e:
        GlocalCLIP(tiny_config(image_size=100))  # Python callers read the field's name
    assert e.value.field == "image_size"
    from glocalclip.apps.flags import for_command_line

    cli = for_command_line(e.value, type(tiny_config()))  # the command line shows the flag
    assert cli.startswith("--image_size 100 is not a multiple")
    with pytest.raises(ValueError, match="use 98 or 112"):  # a backbone passed in is checked too
        GlocalCLIP(tiny_config(image_size=100), clip=tiny_clip)
    with pytest.raises(ValueError, match="smaller than one patch"):
        GlocalCLIP(tiny_config(image_size=10), clip=tiny_clip)
    assert GlocalCLIP(tiny_config(image_size=98), clip=tiny_clip).cfg.image_size == 98


def _partly_masked(root) -> None:
    t = Tree(root)
    t.file("ok/n1.png")
    t.file("ok/n2.png")
    t.file("bad/a.png")
    t.file("bad/b.png")
    t.file("gt/a_mask.png", mask=True)  # b.png has no mask


def test_folder_mode_with_some_masks_missing_refuses_naming_the_flag(tmp_path):
    _partly_masked(tmp_path)
    with pytest.raises(DatasetError, match=r"have no mask .*bad/b\.png.*pass --missing_masks skip"):
        prepare_dataset("folder", tmp_path, quiet=True, class_name="widget", normal="ok", abnormal="bad", masks="gt")
    assert not (tmp_path / "meta.json").exists()


def test_missing_masks_skip_keeps_those_images_for_the_image_loss_only(tmp_path, capsys):
    from glocalclip.datasets.prepare import main

    _partly_masked(tmp_path)
    rc = main(["folder", "--root", str(tmp_path), "--normal", "ok", "--abnormal", "bad", "--masks", "gt",
               "--class-name", "widget", "--missing_masks", "skip"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    entries = json.loads((tmp_path / "meta.json").read_text())["test"]["widget"]
    assert [(e["img_path"], e["mask_path"], e["anomaly"]) for e in entries] == [
        ("bad/a.png", "gt/a_mask.png", 1), ("bad/b.png", "", 1), ("ok/n1.png", "", 0), ("ok/n2.png", "", 0)]
    data = AnomalyDataset(tmp_path, image_size=28)
    has_mask = [data[i]["has_mask"] for i in range(len(data))]
    assert has_mask == [True, False, True, True]  # b.png: no local loss (--unmasked_anomalies auto = skip)
    assert main(["mvtec", "--root", str(tmp_path), "--missing_masks", "skip"]) == 2  # folder mode only


def test_a_predict_input_that_cannot_be_decoded_says_so_without_meta_json(tmp_path):
    from glocalclip.inference.images import read_image as _read

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    cut = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    for path, says in ((junk, "cannot decode image"), (cut, "truncated or corrupt")):
        with pytest.raises(DatasetError) as info:
            _read(path, 56)
        msg = str(info.value)
        assert str(path) in msg and says in msg and "leave it out of the inputs" in msg
        assert "meta.json" not in msg


def test_a_worker_wrapped_dataset_error_keeps_only_its_own_message():
    wrapped = ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "reader.py", line 9, in __getitem__\n    raise DatasetError(msg)\n'
               "glocalclip.datasets.errors.DatasetError: cannot decode image /d/x.png (broken); replace it\n")
    err = DatasetError(wrapped)
    assert str(err) == "cannot decode image /d/x.png (broken); replace it"
    assert err.worker_traceback == wrapped
    assert str(DatasetError("plain message")) == "plain message"
