"""prepare_dataset: run a layout's generator, print the counts, write meta.json atomically."""

from __future__ import annotations

import os

from ..files import remove_leftovers
from . import layouts
from .catalog import resolve_dataset_name
from .errors import DatasetError
from .meta import meta_path, write_meta
from .scan import SPLITS

FOLDER = "folder"


def summarize(meta: dict) -> str:
    """A table of images per class and split: normal, anomalous, anomalous with a mask."""
    rows = [("split", "class", "normal", "anomalous", "with mask")]
    totals = {}
    for split in SPLITS:
        for cls_name, entries in meta.get(split, {}).items():
            normal = sum(1 for e in entries if not e["anomaly"])
            anomalous = len(entries) - normal
            masked = sum(1 for e in entries if e["anomaly"] and e["mask_path"])
            rows.append((split, cls_name, str(normal), str(anomalous), str(masked)))
            t = totals.setdefault(split, [0, 0, 0])
            t[0] += normal
            t[1] += anomalous
            t[2] += masked
    for split, (n, a, m) in totals.items():
        rows.append((split, "TOTAL", str(n), str(a), str(m)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def prepare_dataset(name: str, root, dry_run: bool = False, *, quiet: bool = False, **folder_options) -> dict:
    """Build the meta dict of dataset ``name`` at ``root``, print its counts, write root/meta.json.

    ``name`` is a --dataset name (or a script name such as "sdd", "dagm"), or "folder" with the
    keyword options ``class_name``, ``normal``, ``abnormal``, ``masks``, ``missing_masks``. Nothing is written when
    ``dry_run`` or when the layout is refused (DatasetError); the file is replaced atomically.
    """
    root = os.fspath(root)
    if str(name).lower() == FOLDER:
        meta = layouts.folder(root, **folder_options)
        label = FOLDER
    else:
        if folder_options:
            raise DatasetError(f"options {', '.join(sorted(folder_options))} only apply to the folder mode")
        label = resolve_dataset_name(name)
        meta = layouts.LAYOUTS[label](root)
    if not quiet:
        print(f"{label} at {root}:")
        print(summarize(meta))
    if dry_run:
        if not quiet:
            print(f"dry run: {meta_path(root)} not written")
    else:
        remove_leftovers(root)  # temp files of a run killed while writing meta.json
        path = write_meta(root, meta)
        if not quiet:
            print(f"wrote {path}")
    return meta
