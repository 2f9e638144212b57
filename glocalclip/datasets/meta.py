"""meta.json: its schema, its writer and a tolerant reader.

Schema (docs/design.md §7)::

    {"train": {cls: [entry, ...]}, "test": {cls: [entry, ...]}}
    entry = {"img_path", "mask_path" ("" if none), "cls_name", "specie_name", "anomaly": 0 | 1}

Paths are relative to the dataset root. The reader also accepts the files the original code
wrote: paths with the root prefixed (absolute, or starting with the root's folder name), the
"Train"/"Test" split keys of its DAGM script, and entries whose mask path is a folder.
"""

from __future__ import annotations

import json
import os

from ..files import write_json
from .catalog import DATASET_SCRIPTS
from .errors import DatasetError
from .scan import SPLITS

META_NAME = "meta.json"


def meta_path(root: str) -> str:
    return os.path.join(root, META_NAME)


def write_meta(root: str, meta: dict) -> str:
    """Write root/meta.json atomically, with the umask's permissions (``glocalclip.files``). Returns its path."""
    return os.fspath(write_json(meta_path(root), meta, indent=4, ensure_ascii=False))


def _prepare_hint(root: str, dataset: str | None) -> str:
    if dataset in DATASET_SCRIPTS:
        script = DATASET_SCRIPTS[dataset]
        return f"run python generate_dataset_json/{script}.py --root {root}"
    return (f"run python generate_dataset_json/<name>.py --root {root} for a public dataset "
            f"(names: {', '.join(sorted(set(DATASET_SCRIPTS.values())))}), or "
            f"python generate_dataset_json/folder.py --root {root} --normal DIR --abnormal DIR "
            "[--masks DIR] --class-name NAME for your own images")


class _PathFixer:
    """Maps a stored path to one relative to the root (or absolute outside it), as docs/design.md §7 asks.

    Tried in order: the path relative to the root; the path as an absolute path that exists;
    the path with leading components removed until it exists under the root (the original code
    wrote paths with the root prefixed). The number of components that worked is tried first
    for the next path, so a whole file costs about one stat per path.
    """

    def __init__(self, root: str):
        self.root = root
        self.real_root = os.path.realpath(root)
        self.strip_hint: int | None = None

    def _exists(self, rel_parts: list[str]) -> bool:
        return os.path.exists(os.path.join(self.root, *rel_parts)) if rel_parts else False

    def _relative(self, abs_path: str) -> str:
        real = os.path.realpath(abs_path)
        if os.path.commonpath([self.real_root, real]) == self.real_root:
            return os.path.relpath(real, self.real_root).replace(os.sep, "/")
        return abs_path

    def __call__(self, stored: str) -> str:
        if not stored:
            return ""
        path = stored.replace("\\", "/")
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not os.path.isabs(path) and self._exists(parts):
            return "/".join(parts)
        if os.path.isabs(path) and os.path.exists(path):
            return self._relative(path)
        order = list(range(1, len(parts)))
        if self.strip_hint is not None and self.strip_hint < len(parts):
            order.remove(self.strip_hint)
            order.insert(0, self.strip_hint)
        for k in order:
            if self._exists(parts[k:]):
                self.strip_hint = k
                return "/".join(parts[k:])
        # Not found anywhere: keep it as given; the reader names the missing file.
        return path if os.path.isabs(path) else "/".join(parts)


def _entry(raw, cls_key: str, where: str, fix_path: _PathFixer) -> dict:
    if not isinstance(raw, dict) or "img_path" not in raw:
        raise DatasetError(f"{where}: an entry of class {cls_key!r} is not an object with img_path; "
                           "regenerate meta.json with generate_dataset_json")
    try:
        anomaly = int(raw.get("anomaly", 0))
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: entry {raw.get('img_path')!r} has anomaly {raw.get('anomaly')!r}, "
                           "expected 0 or 1; regenerate meta.json") from None
    if anomaly not in (0, 1):
        raise DatasetError(f"{where}: entry {raw['img_path']!r} has anomaly {anomaly}, expected 0 or 1")
    mask = fix_path(str(raw.get("mask_path") or ""))
    if mask and os.path.isdir(os.path.join(fix_path.root, mask)):
        mask = ""  # the original code's "no mask" (a folder path): treated as no mask, as it did
    return {
        "img_path": fix_path(str(raw["img_path"])),
        "mask_path": mask,
        "cls_name": cls_key,  # the class is the key it is listed under (what AnomalyDataset.classes holds)
        "specie_name": str(raw.get("specie_name") or ""),
        "anomaly": anomaly,
    }


def load_meta(root: str, dataset: str | None = None) -> dict:
    """Read root/meta.json -> {"train": {cls: [entry...]}, "test": {...}} with paths relative to the root.

    ``dataset`` only tailors the hint of the missing-file message. Raises DatasetError for a
    missing root or meta.json, unreadable JSON or a malformed schema.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; check the data path")
    path = meta_path(root)
    if not os.path.isfile(path):
        raise DatasetError(f"{path} not found: the dataset is not prepared; {_prepare_hint(root, dataset)}")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {path} ({exc}); delete it and {_prepare_hint(root, dataset)}") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} is not a JSON object with train/test keys; {_prepare_hint(root, dataset)}")
    splits = {str(k).lower(): v for k, v in raw.items()}  # the original DAGM script wrote "Train"/"Test"
    fix_path = _PathFixer(root)
    meta: dict[str, dict[str, list[dict]]] = {}
    for split in SPLITS:
        classes = splits.get(split) or {}
        if not isinstance(classes, dict):
            raise DatasetError(f"{path}: {split!r} must map class names to lists of entries; "
                               f"{_prepare_hint(root, dataset)}")
        meta[split] = {}
        for cls_key, entries in classes.items():
            if not isinstance(entries, list):
                raise DatasetError(f"{path}: {split}/{cls_key} must be a list of entries")
            meta[split][str(cls_key)] = [_entry(e, str(cls_key), path, fix_path) for e in entries]
    return meta
