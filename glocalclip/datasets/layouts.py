"""One generator per on-disk layout of docs/design.md §7, plus the custom-folder layout.

Each generator takes the dataset root, walks the layout, and returns the meta dict
``{"train": {cls: [entry...]}, "test": {cls: [entry...]}}`` with paths relative to the root,
entries sorted by ``img_path`` and masks paired with their images by file name. Anything
unexpected raises DatasetError before anything is written.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict

from .catalog import DATASET_CLASSES, DATASET_SCRIPTS
from .errors import DatasetError
from .scan import (
    SPLITS, Group, abspath, build_entries, check_class_folders, join, list_images,
    list_subdirs, make_entry, pair_by_name, reject_unexpected_folders, require_dir, require_root, stem,
)

# Mask names accepted per layout, most specific first: the mask stem is the image stem plus one of these.
MVTEC_MASK_SUFFIXES = ("_mask", "")
SAME_STEM_MASK_SUFFIXES = ("", "_mask")
ISIC_MASK_SUFFIXES = ("_Segmentation", "_segmentation", "_mask", "")
DAGM_LABEL_SUFFIX = "_label"


def _empty_meta() -> dict:
    return {split: {} for split in SPLITS}


def _fix(dataset: str) -> str:
    return (f"check --root and the layout in docs/datasets.md, then rerun "
            f"python generate_dataset_json/{DATASET_SCRIPTS.get(dataset, dataset)}.py --root ROOT")


def _add(meta: dict, cls_name: str, per_split: dict[str, list[dict]], required_split: str = "test",
         where: str = "") -> None:
    if not per_split[required_split]:
        raise DatasetError(f"no images found for class {cls_name!r} in the {required_split} split under {where}; "
                           "check that the images were extracted there")
    for split in SPLITS:
        if per_split[split]:
            meta[split][cls_name] = per_split[split]


def mvtec_like(root: str, dataset: str, normal: str = "good", masks: bool = True,
               suffixes: tuple[str, ...] = MVTEC_MASK_SUFFIXES) -> dict:
    """R/cls/{train,test}/{specie}/*, masks R/cls/ground_truth/{specie}/* (MVTec, MPDD, SDD, DTD, BTAD, HeadCT).

    ``test`` is required, ``train`` written where present. Specie ``normal`` is normal, every
    other specie anomalous (with a mask when ``masks``).
    """
    classes = DATASET_CLASSES[dataset]
    require_root(root, _fix(dataset))
    check_class_folders(root, classes, dataset)
    meta = _empty_meta()
    for cls_name in classes:
        groups = []
        for split in SPLITS:
            split_dir = join(cls_name, split)
            if not os.path.isdir(abspath(root, split_dir)):
                if split == "test":
                    require_dir(root, split_dir, _fix(dataset))
                continue
            for specie in list_subdirs(root, split_dir):
                anomalous = specie != normal
                mask_dir = join(cls_name, "ground_truth", specie) if (masks and anomalous) else None
                groups.append(Group(split, specie, join(split_dir, specie), anomalous, mask_dir))
        check = ()
        gt_dir = join(cls_name, "ground_truth")
        if masks and os.path.isdir(abspath(root, gt_dir)):
            check = tuple(join(gt_dir, s) for s in list_subdirs(root, gt_dir))
        _add(meta, cls_name, build_entries(root, cls_name, groups, suffixes, check), where=abspath(root, cls_name))
    return meta


def mvtec(root: str) -> dict:
    return mvtec_like(root, "mvtec")


def mpdd(root: str) -> dict:
    return mvtec_like(root, "mpdd")


def sdd(root: str) -> dict:
    return mvtec_like(root, "SDD")


def dtd(root: str) -> dict:
    return mvtec_like(root, "DTD")


def btad(root: str) -> dict:
    """BTAD: as MVTec with normal specie ``ok``; masks share the image's stem, any extension."""
    return mvtec_like(root, "btad", normal="ok", suffixes=SAME_STEM_MASK_SUFFIXES)


def headct(root: str) -> dict:
    """HeadCT: R/brain/test/{good, anomalous...}/*, no masks."""
    return mvtec_like(root, "headct", masks=False)


VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def visa(root: str) -> dict:
    """VisA: R/split_csv/1cls.csv with columns object,split,label,image,mask (paths relative to R)."""
    dataset = "visa"
    classes = DATASET_CLASSES[dataset]
    require_root(root, _fix(dataset))
    csv_path = os.path.join(root, "split_csv", "1cls.csv")
    if not os.path.isfile(csv_path):
        raise DatasetError(f"VisA split file {csv_path} is missing; it ships with VisA (split_csv/1cls.csv); "
                           + _fix(dataset))
    check_class_folders(root, classes, dataset, ignore=("split_csv",))
    per_class: dict[str, dict[str, list[dict]]] = {c: {s: [] for s in SPLITS} for c in classes}
    mask_dirs: dict[str, set[str]] = defaultdict(set)  # mask folder -> mask names referenced
    for where, cells in _visa_rows(csv_path):
        entry = _visa_entry(root, where, cells, classes)
        if entry["mask_path"]:
            folder, _, name = entry["mask_path"].rpartition("/")
            mask_dirs[folder].add(name)
        per_class[entry["cls_name"]][cells[1]].append(entry)
    for folder, referenced in mask_dirs.items():
        orphans = [abspath(root, join(folder, n)) for n in list_images(root, folder) if n not in referenced]
        if orphans:
            raise DatasetError(f"{len(orphans)} mask(s) in {abspath(root, folder)} belong to no image of "
                               f"{csv_path}, e.g. {orphans[0]}; restore the csv or remove those masks")
    meta = _empty_meta()
    for cls_name in classes:
        for split in SPLITS:
            per_class[cls_name][split].sort(key=lambda e: e["img_path"])
        _add(meta, cls_name, per_class[cls_name], where=csv_path)
    return meta


def _visa_rows(csv_path: str):
    """Each non-empty row of VisA's split file as (where, its cells in ``VISA_COLUMNS`` order, stripped)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DatasetError(f"{csv_path} is empty; restore it from the VisA download")
    header = [h.strip().lower() for h in rows[0]]
    if not all(c in header for c in VISA_COLUMNS):
        raise DatasetError(f"{csv_path} must have the header columns {','.join(VISA_COLUMNS)}; "
                           f"found {','.join(rows[0])}")
    pos = {c: header.index(c) for c in VISA_COLUMNS}
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        try:
            cells = tuple(row[pos[c]].strip() for c in VISA_COLUMNS)
        except IndexError:
            raise DatasetError(f"{csv_path} line {lineno} has {len(row)} columns, "
                               f"expected {len(VISA_COLUMNS)}") from None
        yield f"{csv_path} line {lineno}", cells


def _visa_entry(root: str, where: str, cells: tuple[str, ...], classes) -> dict:
    """The entry of one row of VisA's split file, its image (and mask, if anomalous) checked on disk."""
    obj, split, label, image, mask = cells
    if obj not in classes:
        raise DatasetError(f"{where}: object {obj!r} is not a VisA class; expected one of {', '.join(classes)}")
    if split not in SPLITS:
        raise DatasetError(f"{where}: split {split!r} must be train or test")
    if label not in ("normal", "anomaly"):
        raise DatasetError(f"{where}: label {label!r} must be normal or anomaly")
    image = image.replace("\\", "/")
    if not os.path.isfile(abspath(root, image)):
        raise DatasetError(f"{where}: image {abspath(root, image)} does not exist; re-extract VisA under {root}")
    anomalous = label == "anomaly"
    mask_rel = ""
    if anomalous:
        mask_rel = mask.replace("\\", "/")
        if not mask_rel:
            raise DatasetError(f"{where}: anomalous image {abspath(root, image)} has no mask in the csv; "
                               "restore split_csv/1cls.csv from the VisA download")
        if not os.path.isfile(abspath(root, mask_rel)):
            raise DatasetError(f"{where}: mask {abspath(root, mask_rel)} of anomalous image "
                               f"{abspath(root, image)} does not exist; re-extract VisA under {root}")
    return make_entry(image, mask_rel, obj, "", anomalous)


def dagm(root: str) -> dict:
    """DAGM (Kaggle upload): R/ClassK/{Train,Test}/*.PNG, labels R/ClassK/{Train,Test}/Label/XXXX_label.PNG.

    An image with a label file is anomalous and that file is its mask. ``Test`` is required,
    ``Train`` written where present; the splits are stored as ``train``/``test``.
    """
    dataset = "DAGM_KaggleUpload"
    classes = DATASET_CLASSES[dataset]
    require_root(root, _fix(dataset))
    check_class_folders(root, classes, dataset)
    meta = _empty_meta()
    for cls_name in classes:
        per_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for split, folder in (("train", "Train"), ("test", "Test")):
            split_dir = join(cls_name, folder)
            if not os.path.isdir(abspath(root, split_dir)):
                if split == "test":
                    require_dir(root, split_dir, _fix(dataset))
                continue
            images = list_images(root, split_dir, allowed_subdirs=("Label",))
            label_dir = join(split_dir, "Label")
            labels = list_images(root, label_dir) if os.path.isdir(abspath(root, label_dir)) else []
            labels = [n for n in labels if stem(n).endswith(DAGM_LABEL_SUFFIX)]
            pairs = pair_by_name(images, labels, (DAGM_LABEL_SUFFIX,), abspath(root, split_dir))
            orphans = sorted(set(labels) - set(pairs.values()))
            if orphans:
                raise DatasetError(
                    f"label file {abspath(root, join(label_dir, orphans[0]))} has no image "
                    f"{stem(orphans[0])[: -len(DAGM_LABEL_SUFFIX)]}.<ext> in {abspath(root, split_dir)}"
                    f"{f' ({len(orphans)} such labels)' if len(orphans) > 1 else ''}; restore the image or remove the label")
            for name in images:
                mask = pairs.get(name)
                per_split[split].append(make_entry(join(split_dir, name), join(label_dir, mask) if mask else "",
                                                   cls_name, "", mask is not None))
            per_split[split].sort(key=lambda e: e["img_path"])
        _add(meta, cls_name, per_split, where=abspath(root, cls_name))
    return meta


def _species_no_masks(root: str, dataset: str, folder: str, is_normal, allowed: tuple[str, ...] | None) -> dict:
    """R/folder/{specie}/* with no masks, all in the test split (brain sets, COVID-19)."""
    cls_name = DATASET_CLASSES[dataset][0]
    require_root(root, _fix(dataset))
    require_dir(root, folder, _fix(dataset))
    species = list_subdirs(root, folder)
    if allowed is not None:
        reject_unexpected_folders(abspath(root, folder), species, allowed, f"expected in {abspath(root, folder)}",
                                  f"expected only {' and '.join(allowed)} ({allowed[0]} = normal). "
                                  "Move the other folders out")
    if not species:
        raise DatasetError(f"{abspath(root, folder)} holds no specie folders; " + _fix(dataset))
    groups = [Group("test", s, join(folder, s), not is_normal(s)) for s in species]
    meta = _empty_meta()
    _add(meta, cls_name, build_entries(root, cls_name, groups, ()), where=abspath(root, folder))
    return meta


def brain_mri(root: str) -> dict:
    """BrainMRI: R/brain_tumor_dataset/{no,yes}/* (no = normal), no masks."""
    return _species_no_masks(root, "brain_mri", "brain_tumor_dataset", lambda s: s == "no", ("no", "yes"))


def br35h(root: str) -> dict:
    """Br35H: R/br35/{no,yes}/* (no = normal), no masks."""
    return _species_no_masks(root, "br35h", "br35", lambda s: s == "no", ("no", "yes"))


def covid19(root: str) -> dict:
    """COVID-19: R/covid/{NORMAL, other...}/* (NORMAL, any letter case, = normal), no masks."""
    return _species_no_masks(root, "covid19", "covid", lambda s: s.lower() == "normal", None)


def isic(root: str) -> dict:
    """ISIC: R/skin/test/{specie}/*, masks R/skin/ground_truth/defect/* (ISIC's ``_Segmentation`` names accepted).

    Every specie is anomalous except a ``good`` one, as in the original code.
    """
    dataset = "ISIC"
    cls_name = DATASET_CLASSES[dataset][0]
    require_root(root, _fix(dataset))
    check_class_folders(root, DATASET_CLASSES[dataset], dataset)
    test_dir = join(cls_name, "test")
    require_dir(root, test_dir, _fix(dataset))
    mask_dir = join(cls_name, "ground_truth", "defect")
    groups = [Group("test", s, join(test_dir, s), s != "good", mask_dir if s != "good" else None)
              for s in list_subdirs(root, test_dir)]
    meta = _empty_meta()
    _add(meta, cls_name, build_entries(root, cls_name, groups, ISIC_MASK_SUFFIXES, (mask_dir,)),
         where=abspath(root, test_dir))
    return meta


def _flat_pair(root: str, dataset: str, image_dir: str, mask_dir: str) -> dict:
    """R/image_dir/*, masks R/mask_dir/* with the same stem; every image anomalous."""
    cls_name = DATASET_CLASSES[dataset][0]
    require_root(root, _fix(dataset))
    require_dir(root, image_dir, _fix(dataset))
    require_dir(root, mask_dir, _fix(dataset))
    groups = [Group("test", "", image_dir, True, mask_dir)]
    meta = _empty_meta()
    _add(meta, cls_name, build_entries(root, cls_name, groups, SAME_STEM_MASK_SUFFIXES),
         where=abspath(root, image_dir))
    return meta


def clinicdb(root: str) -> dict:
    """CVC-ClinicDB: R/images/*, R/masks/* (same stem, all anomalous)."""
    return _flat_pair(root, "clinicdb", "images", "masks")


def colondb(root: str) -> dict:
    """CVC-ColonDB: R/images/*, R/masks/* (same stem, all anomalous)."""
    return _flat_pair(root, "colondb", "images", "masks")


def kvasir(root: str) -> dict:
    """Kvasir-SEG: R/images/*, R/masks/* (same stem, all anomalous)."""
    return _flat_pair(root, "kvasir", "images", "masks")


def tn3k(root: str) -> dict:
    """TN3K: R/test-image/*, R/test-mask/* (same stem, all anomalous); the trainval folders are not read."""
    return _flat_pair(root, "tn3k", "test-image", "test-mask")


def endo(root: str) -> dict:
    """Endo: R/{specie...}/*, masks R/masks/* (same stem); specie ``good`` normal, others anomalous."""
    dataset = "endo"
    cls_name = DATASET_CLASSES[dataset][0]
    require_root(root, _fix(dataset))
    species = [s for s in list_subdirs(root, "") if s != "masks"]
    if not species:
        raise DatasetError(f"{root} holds no image folders besides masks/; " + _fix(dataset))
    groups = [Group("test", s, s, s != "good", "masks" if s != "good" else None) for s in species]
    meta = _empty_meta()
    _add(meta, cls_name, build_entries(root, cls_name, groups, SAME_STEM_MASK_SUFFIXES, ("masks",)), where=root)
    return meta


def _inside_root(root: str, folder: str, option: str) -> str:
    """A folder option given relative to the root or absolute inside it -> its path relative to the root."""
    path = folder if os.path.isabs(folder) else os.path.join(root, folder)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise DatasetError(f"{option} {folder} is outside the root {root}; meta.json stores paths relative to the "
                           "root, so move the folder inside it or choose a root that contains it")
    if not os.path.isdir(real):
        raise DatasetError(f"{option} folder {path} does not exist; give a folder relative to --root {root} "
                           "or an absolute path inside it")
    rel = os.path.relpath(real, real_root).replace(os.sep, "/")
    return "" if rel == "." else rel


MISSING_MASKS = ("refuse", "skip")


def folder(root: str, class_name: str, normal: str | None = None, abnormal: str | None = None,
           masks: str | None = None, missing_masks: str = "refuse") -> dict:
    """Custom data: normal and anomalous images in two folders, masks optional (same stem or stem_mask).

    Everything goes to the test split under class ``class_name``. Without ``masks`` the
    anomalous entries have ``mask_path`` "" (image-level metrics only, no local loss for them).
    With ``masks``, an anomalous image without one is refused, or with ``missing_masks="skip"``
    kept with ``mask_path`` "" like them.
    """
    if missing_masks not in MISSING_MASKS:
        raise DatasetError(f"--missing_masks must be one of {', '.join(MISSING_MASKS)}, got {missing_masks!r}")
    fix = ("usage: generate_dataset_json/folder.py --root R --normal DIR --abnormal DIR [--masks DIR] "
           "--class-name NAME")
    require_root(root, fix)
    if not class_name or not str(class_name).strip() or "/" in class_name:
        raise DatasetError(f"--class-name must be a non-empty name without '/', got {class_name!r}; {fix}")
    if normal is None and abnormal is None:
        raise DatasetError(f"give at least one of --normal and --abnormal; {fix}")
    groups = []
    if normal is not None:
        groups.append(Group("test", "good", _inside_root(root, normal, "--normal"), False))
    mask_rel = _inside_root(root, masks, "--masks") if masks is not None else None
    if abnormal is not None:
        groups.append(Group("test", "defect", _inside_root(root, abnormal, "--abnormal"), True, mask_rel))
    if masks is not None and abnormal is None:
        raise DatasetError(f"--masks was given without --abnormal; masks belong to anomalous images. {fix}")
    if len({g.image_dir for g in groups} | ({mask_rel} if mask_rel is not None else set())) \
            < len(groups) + (mask_rel is not None):
        raise DatasetError("--normal, --abnormal and --masks must be three different folders "
                           "(a mask inside an image folder would be read as an image)")
    check: tuple[str, ...] = ()
    normal_stems: set[str] = set()
    if mask_rel is not None:
        check = (mask_rel,)
        normal_stems = {stem(n) for g in groups if not g.anomalous for n in list_images(root, g.image_dir)}

    def names_a_normal_image(mask_name: str) -> bool:
        # Masks of normal images (all-black ones, say) may sit in the mask folder; they are ignored.
        s = stem(mask_name)
        return s in normal_stems or (s.endswith("_mask") and s[: -len("_mask")] in normal_stems)

    meta = _empty_meta()
    per_split = build_entries(root, class_name, groups, SAME_STEM_MASK_SUFFIXES, check,
                              unmatched_ok=names_a_normal_image, missing_masks=missing_masks)
    _add(meta, class_name, per_split, where=root)
    return meta


#: ``--dataset`` name -> its generator.
LAYOUTS = {
    "mvtec": mvtec, "visa": visa, "mpdd": mpdd, "btad": btad, "SDD": sdd, "DTD": dtd,
    "DAGM_KaggleUpload": dagm, "headct": headct, "brain_mri": brain_mri, "br35h": br35h,
    "covid19": covid19, "ISIC": isic, "clinicdb": clinicdb, "colondb": colondb, "kvasir": kvasir,
    "endo": endo, "tn3k": tn3k,
}
assert set(LAYOUTS) == set(DATASET_CLASSES)
