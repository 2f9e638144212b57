"""The torch Dataset over a prepared dataset root (its meta.json)."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from .catalog import DATASET_CLASSES, resolve_dataset_name
from .errors import DatasetError
from .meta import load_meta, meta_path
from .pixels import decoded, exif_upright, open_image
from .preprocess import image_to_tensor, image_to_uint8, mask_to_tensor
from .scan import SPLITS


class AnomalyDataset(Dataset):
    """Images, masks and labels of one split of a prepared dataset.

    ``classes``: None = every class with entries in the split (in DATASET_CLASSES order when
    ``dataset`` is given, else sorted; with ``meta_order``, in meta.json's order). ``dataset`` given: class names, requested or found in
    meta.json, must belong to it. Items are dicts with "image" [3,S,S], "mask" [S,S] (zeros for
    normal images and anomalous images without a mask), "label", "has_mask", "cls_name",
    "img_path" (absolute) and "index". With ``as_uint8`` the image is the resized uint8 RGB
    [3,S,S] and the mask uint8: loaders move a quarter of the bytes, and ``normalize_image`` on
    the device gives exactly the float image. Without ``dataset`` (folder-mode data) images and
    masks are turned as their EXIF orientation says (``upright``), so maps line up with the photo
    as shown.
    """

    def __init__(self, root, split: str = "test", image_size: int = 518, classes=None, dataset: str | None = None,
                 as_uint8: bool = False, meta_order: bool = False):
        self.root = os.path.abspath(os.fspath(root))
        self.as_uint8 = as_uint8
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.split = split
        self.image_size = int(image_size)
        self.dataset = resolve_dataset_name(dataset) if dataset is not None else None
        # folder-mode data (your own photos) is read as shown, EXIF orientation applied; a named
        # dataset as stored, as the original code read it (docs/design.md §5)
        self.upright = self.dataset is None
        meta = load_meta(self.root, self.dataset)
        available = {c: e for c, e in meta[split].items() if e}
        if not available:
            raise DatasetError(f"the {split} split of {meta_path(self.root)} has no images; "
                               + ("training reads the test split of the auxiliary dataset; " if split == "train" else "")
                               + "regenerate meta.json with generate_dataset_json or choose another split")
        valid = DATASET_CLASSES[self.dataset] if self.dataset is not None else None
        if valid is not None:
            foreign = sorted(c for c in available if c not in valid)
            if foreign:
                raise DatasetError(
                    f"{meta_path(self.root)} holds class(es) {', '.join(foreign)}, which are not classes of "
                    f"{self.dataset} ({', '.join(valid)}); pass the dataset name matching the data, or omit --dataset "
                    "for your own data")
        if classes is None and meta_order:  # the order meta.json lists them in (training, as the original)
            names = list(available)
        elif classes is None:
            names = [c for c in valid if c in available] if valid is not None else sorted(available)
        else:
            names = [classes] if isinstance(classes, str) else [str(c) for c in classes]
            known = valid if valid is not None else tuple(sorted(available))
            unknown = [c for c in names if c not in known]
            if unknown:
                raise DatasetError(f"unknown class name(s) {', '.join(map(repr, unknown))}"
                                   f"{' for ' + self.dataset if self.dataset else ''}; valid: {', '.join(known)}")
            empty = [c for c in names if c not in available]
            if empty:
                raise DatasetError(f"class(es) {', '.join(map(repr, empty))} have no images in the {split} split of "
                                   f"{meta_path(self.root)}; classes with images: {', '.join(sorted(available))}")
            if not names:
                raise DatasetError("classes is an empty list; pass None for all classes")
        self.classes: list[str] = names
        self.entries: list[dict] = [e for c in names for e in available[c]]
        self._check_files()

    def _abs(self, rel: str) -> str:
        return rel if os.path.isabs(rel) else os.path.join(self.root, *rel.split("/"))

    def _check_files(self) -> None:
        """Fail now, not hours into a run, when meta.json names files that are not there."""
        missing = []
        for e in self.entries:
            for key in ("img_path", "mask_path"):
                if e[key] and (key == "img_path" or e["anomaly"]) and not os.path.isfile(self._abs(e[key])):
                    missing.append(self._abs(e[key]))
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise DatasetError(f"{len(missing)} file(s) listed in {meta_path(self.root)} do not exist: {shown}; "
                               "restore them, or regenerate meta.json (python generate_dataset_json/<name>.py --root "
                               f"{self.root})")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        e = self.entries[index]
        img_path = self._abs(e["img_path"])
        anomalous = int(e["anomaly"]) == 1
        has_mask = (not anomalous) or bool(e["mask_path"])
        S = self.image_size
        with open_image(img_path, "image") as opened:
            img = exif_upright(decoded(opened, "image")) if self.upright else opened
            if anomalous and e["mask_path"]:
                mask = self._mask(self._abs(e["mask_path"]), img.size, img_path)
            else:
                mask = torch.zeros(S, S, dtype=torch.float32)
            if self.as_uint8:
                image = image_to_uint8(decoded(img, "image"), S)
                mask = mask.to(torch.uint8)
            else:
                image = image_to_tensor(decoded(img, "image"), S)
        return {"image": image, "mask": mask, "label": 1 if anomalous else 0, "has_mask": has_mask,
                "cls_name": e["cls_name"], "img_path": img_path, "index": index}

    def _mask(self, mask_file: str, image_size: tuple[int, int], img_path: str) -> torch.Tensor:
        """The mask [S, S] in {0, 1}; it must have its image's size (both as shown, in folder mode)."""
        with open_image(mask_file, "mask") as opened:
            m = exif_upright(decoded(opened, "mask")) if self.upright else opened
            if m.size != image_size:
                raise DatasetError(
                    f"mask {mask_file} is {m.size[0]}x{m.size[1]} but its image {img_path} is "
                    f"{image_size[0]}x{image_size[1]}; fix or replace the mask, or regenerate meta.json")
            return mask_to_tensor(decoded(m, "mask"), self.image_size)


def collate(items: list[dict]) -> dict:
    """Batch ``AnomalyDataset`` items: images and masks stacked, numbers as tensors, paths as lists."""
    return {"index": torch.tensor([it["index"] for it in items]),
            "image": torch.stack([it["image"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
            "label": torch.tensor([it["label"] for it in items]),
            "has_mask": torch.tensor([it["has_mask"] for it in items]),
            "img_path": [it["img_path"] for it in items],
            "cls_name": [it["cls_name"] for it in items]}
