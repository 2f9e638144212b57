"""Command line: prepare a dataset's meta.json.

    python -m glocalclip.datasets.prepare NAME --root PATH [--dry-run]
    python -m glocalclip.datasets.prepare folder --root R --normal DIR --abnormal DIR [--masks DIR]
        [--missing_masks skip] --class-name NAME

The generate_dataset_json/*.py scripts are thin wrappers around ``main``.
"""

from __future__ import annotations

import argparse
import sys

from ..files import OutputError
from .catalog import DATASET_CLASSES
from .errors import DatasetError
from .generate import FOLDER, prepare_dataset
from .layouts import MISSING_MASKS

def build_parser(prog: str | None = None, fixed_name: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m glocalclip.datasets.prepare",
        description="Write ROOT/meta.json for a dataset laid out as in docs/datasets.md "
                    "(paths relative to ROOT, masks paired with images by name).")
    if fixed_name is None:
        p.add_argument("name", help=f"dataset: {', '.join(DATASET_CLASSES)}, or {FOLDER} for your own images")
    p.add_argument("--root", required=True, help="the dataset's root folder (meta.json is written there)")
    p.add_argument("--dry-run", action="store_true", help="print the counts, write nothing")
    if fixed_name in (None, FOLDER):
        g = p.add_argument_group("folder mode (your own images)")
        g.add_argument("--normal", help="folder of normal images (relative to --root, or absolute inside it)")
        g.add_argument("--abnormal", help="folder of anomalous images")
        g.add_argument("--masks", help="folder of masks of the anomalous images, named <stem>.png or "
                                       "<stem>_mask.png (optional: without it only image-level metrics)")
        g.add_argument("--class-name", help="the class (object) name used in the prompts and the results")
        g.add_argument("--missing_masks", "--missing-masks", choices=MISSING_MASKS, default="refuse",
                       help="anomalous images without a mask in --masks: refuse (default), or skip = keep them "
                            "for the image-level loss and metrics only (their mask_path is empty)")
    return p


def main(argv=None, fixed_name: str | None = None, prog: str | None = None) -> int:
    args = build_parser(prog, fixed_name).parse_args(argv)
    name = fixed_name or args.name
    options = {}
    is_folder = str(name).lower() == FOLDER
    if is_folder:
        if not args.class_name:
            print("error: the folder mode needs --class-name NAME", file=sys.stderr)
            return 2
        options = {"class_name": args.class_name, "normal": args.normal, "abnormal": args.abnormal,
                   "masks": args.masks, "missing_masks": args.missing_masks}
    elif fixed_name is None and (any(getattr(args, k) for k in ("normal", "abnormal", "masks", "class_name"))
                                 or args.missing_masks != "refuse"):
        print("error: --normal/--abnormal/--masks/--class-name/--missing_masks only apply to the folder mode",
              file=sys.stderr)
        return 2
    try:
        prepare_dataset(name, args.root, dry_run=args.dry_run, **options)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("meta.json was not written.", file=sys.stderr)
        return 1
    except OutputError as exc:  # the root is read-only, full, ...: nothing half written is left
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
