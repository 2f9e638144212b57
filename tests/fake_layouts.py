"""Tiny fake datasets in each real on-disk layout, with the meta entries a correct generator must write.

Every builder writes the files and records, independently of the code under test, which mask
belongs to which image. Names are chosen so that sorted image order and sorted mask order differ
("1.png", "10.png" vs "10_mask.png", "1_mask.png"), so pairing by list position would fail.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

W, H = 20, 16  # tiny images; masks have the same size


def _write_image(path: str, seed: int, size=(W, H)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _write_mask(path: str, seed: int, size=(W, H)) -> None:
    """A white box whose place depends on ``seed``, big enough to survive resizing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0 = seed % (size[0] - 8)
    arr[4:12, x0:x0 + 8] = 255
    Image.fromarray(arr).save(path)


class Tree:
    """Writes a fake layout under ``root`` and collects the expected meta."""

    def __init__(self, root):
        self.root = str(root)
        self.expected = {"train": {}, "test": {}}
        self._seed = 0

    def path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def file(self, rel: str, mask: bool = False) -> None:
        self._seed += 1
        (_write_mask if mask else _write_image)(self.path(rel), self._seed)

    def add(self, split: str, cls: str, img: str, mask: str = "", anomaly: int = 0, specie: str = "",
            write_mask: bool = True) -> None:
        self.file(img)
        if mask and write_mask:
            self.file(mask, mask=True)
        self.expected[split].setdefault(cls, []).append(
            {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie, "anomaly": anomaly})

    def expected_meta(self) -> dict:
        return {split: {c: sorted(v, key=lambda e: e["img_path"]) for c, v in classes.items()}
                for split, classes in self.expected.items()}


def mvtec_like(root, classes, normal="good", img_ext=".png", mask_name=lambda s: f"{s}_mask.png",
               with_train=True, masks=True) -> Tree:
    t = Tree(root)
    for cls in classes:
        if with_train:
            for s in ("000", "001"):
                t.add("train", cls, f"{cls}/train/{normal}/{s}{img_ext}", specie=normal)
        for s in ("000", "1"):
            t.add("test", cls, f"{cls}/test/{normal}/{s}{img_ext}", specie=normal)
        for specie, stems in (("crack", ("1", "10", "2")), ("scratch", ("000",))):
            for s in stems:
                mask = f"{cls}/ground_truth/{specie}/{mask_name(s)}" if masks else ""
                t.add("test", cls, f"{cls}/test/{specie}/{s}{img_ext}", mask, 1, specie)
    return t


def build_mvtec(root, dataset="mvtec"):
    from glocalclip.datasets import DATASET_CLASSES
    return mvtec_like(root, DATASET_CLASSES[dataset])


def build_btad(root):
    # BTAD: ok/ko, images .bmp, masks .png with the same stem (one with "_mask" to show the fallback)
    return mvtec_like(root, ("01", "02", "03"), normal="ok", img_ext=".bmp",
                      mask_name=lambda s: f"{s}_mask.png" if s == "1" else f"{s}.png")


def build_headct(root):
    t = Tree(root)
    for s in ("000", "010", "002"):
        t.add("test", "brain", f"brain/test/good/{s}.png", specie="good")
    for s in ("100", "011"):
        t.add("test", "brain", f"brain/test/hemorrhage/{s}.png", anomaly=1, specie="hemorrhage")
    return t


def _no_yes(root, folder, normal="no", others=("yes",), cls="brain"):
    t = Tree(root)
    for name in ("N1.jpg", "N10.JPG", "no 2.jpeg"):
        t.add("test", cls, f"{folder}/{normal}/{name}", specie=normal)
    for specie in others:
        for name in ("Y1.jpg", "Y2.png"):
            t.add("test", cls, f"{folder}/{specie}/{name}", anomaly=1, specie=specie)
    return t


def build_brain_mri(root):
    return _no_yes(root, "brain_tumor_dataset")


def build_br35h(root):
    return _no_yes(root, "br35")


def build_covid(root):
    return _no_yes(root, "covid", normal="NORMAL", others=("COVID", "Viral Pneumonia"), cls="chest")


def build_isic(root):
    t = Tree(root)
    for s in ("ISIC_0000010", "ISIC_0000001", "ISIC_0000003"):
        t.add("test", "skin", f"skin/test/defect/{s}.jpg", f"skin/ground_truth/defect/{s}_Segmentation.png",
              1, "defect")
    return t


def build_polyp(root, cls="colon", image_dir="images", mask_dir="masks"):
    t = Tree(root)
    # same stem, any extension; "1_mask" shows the fallback and makes list orders differ
    for img, mask in (("1.png", "1_mask.png"), ("10.png", "10.png"), ("2.jpg", "2.tif"), ("3.tif", "3.jpg")):
        t.add("test", cls, f"{image_dir}/{img}", f"{mask_dir}/{mask}", 1, "")
    return t


def build_tn3k(root):
    t = build_polyp(root, "thyroid", "test-image", "test-mask")
    t.file("trainval-image/0001.jpg")  # other TN3K folders are not read
    t.file("trainval-mask/0002.jpg", mask=True)
    return t


def build_endo(root):
    t = Tree(root)
    for s in ("g1", "g10"):
        t.add("test", "colon", f"good/{s}.jpg", specie="good")
    for specie, stems in (("polyps", ("1", "10")), ("ulcer", ("u2",))):
        for s in stems:
            t.add("test", "colon", f"{specie}/{s}.jpg", f"masks/{s}_mask.png" if s == "1" else f"masks/{s}.png",
                  1, specie)
    return t


def build_dagm(root):
    t = Tree(root)
    for k in range(1, 11):
        cls = f"Class{k}"
        for split, folder in (("train", "Train"), ("test", "Test")):
            for s in ("0001", "0010", "0002"):
                anomalous = s != "0001"
                label = f"{cls}/{folder}/Label/{s}_label.PNG" if anomalous else ""
                t.add(split, cls, f"{cls}/{folder}/{s}.PNG", label, int(anomalous), "")
            with open(t.path(f"{cls}/{folder}/Label/Labels.txt"), "w") as f:
                f.write("Num\tLabel\n")  # DAGM ships this text file; it is not an image
    return t


VISA_CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")


def build_visa(root):
    t = Tree(root)
    rows = []
    for cls in VISA_CLASSES:
        for split, s in (("train", "0001"), ("test", "0000"), ("train", "0010")):
            img = f"{cls}/Data/Images/Normal/{s}.JPG"
            t.add(split, cls, img)
            rows.append([cls, split, "normal", img, ""])
        for s in ("010", "001"):
            img, mask = f"{cls}/Data/Images/Anomaly/{s}.JPG", f"{cls}/Data/Masks/Anomaly/{s}.png"
            t.add("test", cls, img, mask, 1)
            rows.append([cls, "test", "anomaly", img, mask])
    rows.reverse()  # csv order is not the sorted order
    os.makedirs(t.path("split_csv"))
    with open(t.path("split_csv/1cls.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return t


#: --dataset name -> (builder, generate_dataset_json script name)
BUILDERS = {
    "mvtec": (build_mvtec, "mvtec"),
    "visa": (build_visa, "visa"),
    "mpdd": (lambda r: build_mvtec(r, "mpdd"), "mpdd"),
    "btad": (build_btad, "btad"),
    "SDD": (lambda r: build_mvtec(r, "SDD"), "sdd"),
    "DTD": (lambda r: build_mvtec(r, "DTD"), "dtd"),
    "DAGM_KaggleUpload": (build_dagm, "dagm"),
    "headct": (build_headct, "headct"),
    "brain_mri": (build_brain_mri, "brainmri"),
    "br35h": (build_br35h, "br35h"),
    "covid19": (build_covid, "covid"),
    "ISIC": (build_isic, "isic"),
    "clinicdb": (build_polyp, "clinicdb"),
    "colondb": (build_polyp, "colondb"),
    "kvasir": (build_polyp, "kvasir"),
    "endo": (build_endo, "endo"),
    "tn3k": (build_tn3k, "tn3k"),
}
