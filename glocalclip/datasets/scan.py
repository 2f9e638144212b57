"""Filesystem helpers shared by the layout generators: listing folders and images, pairing masks by name;
and the one expansion of image inputs (files, folders, globs) that ``predict``'s inputs and few-shot's
``--reference`` share.

Every dataset path handed around here is relative to the dataset root and uses forward slashes, because
that is what ``meta.json`` stores.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import DatasetError

#: File name extensions (lower-case) treated as images; anything else in a folder is ignored.
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".tif", ".tiff", ".gif", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
})

SPLITS = ("train", "test")

#: why an input of :func:`expand_image_inputs` gave no files
NO_SUCH_PATH = "no such file or folder"
NO_IMAGES = "no images found"


def join(*parts: str) -> str:
    """Join relative path pieces with '/', skipping empty ones."""
    return "/".join(p.strip("/") for p in parts if p not in ("", "."))


def abspath(root: str, rel: str) -> str:
    return os.path.join(root, *rel.split("/")) if rel else root


def is_ignored(name: str) -> bool:
    """Hidden files and folders and OS clutter (``.DS_Store``, ``__MACOSX``, ``Thumbs.db``)."""
    return name.startswith(".") or name.startswith("__") or name.lower() in ("thumbs.db", "desktop.ini")


def is_image_name(name: str) -> bool:
    return not is_ignored(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def stem(name: str) -> str:
    return os.path.splitext(name)[0]


def require_root(root: str, fix: str) -> None:
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise DatasetError(f"dataset root {root} {what}; {fix}")


def require_dir(root: str, rel: str, fix: str) -> None:
    path = abspath(root, rel)
    if not os.path.isdir(path):
        raise DatasetError(f"expected folder {path} is missing; {fix}")


def list_subdirs(root: str, rel: str) -> list[str]:
    """Sorted names of the visible sub-folders of root/rel."""
    path = abspath(root, rel)
    with os.scandir(path) as it:
        return sorted(e.name for e in it if e.is_dir() and not is_ignored(e.name))


def list_images(root: str, rel: str, allowed_subdirs: tuple[str, ...] = ()) -> list[str]:
    """Sorted image file names directly inside root/rel.

    Non-image files are skipped. A sub-folder (other than ``allowed_subdirs``) is refused: images
    are expected directly in the folder, and silently skipping a folder would drop data.
    """
    path = abspath(root, rel)
    names = []
    with os.scandir(path) as it:
        for e in it:
            if is_ignored(e.name):
                continue
            if e.is_dir():
                if e.name not in allowed_subdirs:
                    raise DatasetError(
                        f"unexpected folder {os.path.join(path, e.name)}: images are expected directly in "
                        f"{path}; move its images up into {path} or move the folder out of the dataset")
                continue
            if is_image_name(e.name):
                names.append(e.name)
    return sorted(names)


def reject_unexpected_folders(parent: str, present: list[str], allowed: tuple[str, ...], what: str,
                              fix: str) -> None:
    """Raise if ``parent`` holds folders outside ``allowed``: a stray folder would otherwise be read as
    data (or silently skipped), and the numbers would not be the dataset's."""
    unknown = [d for d in present if d not in allowed]
    if unknown:
        raise DatasetError(f"folder(s) {', '.join(repr(os.path.join(parent, d)) for d in unknown)} are not "
                           f"{what}; {fix}")


def check_class_folders(root: str, classes: tuple[str, ...], dataset: str, ignore: tuple[str, ...] = ()) -> None:
    """Every class has a folder at the root and every folder at the root is a class."""
    present = [d for d in list_subdirs(root, "") if d not in ignore]
    reject_unexpected_folders(root, present, classes, f"classes of {dataset}",
                              f"expected class folders: {', '.join(classes)}. Move the other folders out of {root} "
                              "(or prepare your own data with generate_dataset_json/folder.py)")
    missing = [c for c in classes if c not in present]
    if missing:
        raise DatasetError(
            f"class folder(s) {', '.join(repr(os.path.join(root, c)) for c in missing)} are missing for {dataset} "
            f"(expected class folders: {', '.join(classes)}); check --root points at the extracted dataset")


def make_entry(img_path: str, mask_path: str, cls_name: str, specie: str, anomaly: bool) -> dict:
    return {"img_path": img_path, "mask_path": mask_path, "cls_name": cls_name,
            "specie_name": specie, "anomaly": 1 if anomaly else 0}


def _mask_index(mask_names: list[str], suffixes: tuple[str, ...]) -> dict[str, list[tuple[int, str]]]:
    """image stem -> [(preference, mask name)] for every way a mask name can be read."""
    index: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for name in mask_names:
        s = stem(name)
        for rank, suffix in enumerate(suffixes):
            if not suffix:
                index[s].append((rank, name))
            elif s.endswith(suffix) and len(s) > len(suffix):
                index[s[: -len(suffix)]].append((rank, name))
    return index


def pair_by_name(image_names: list[str], mask_names: list[str], suffixes: tuple[str, ...],
                 where: str) -> dict[str, str]:
    """Pair images with masks by file name: mask stem == image stem + one of ``suffixes``.

    Extensions may differ (``a.bmp`` <-> ``a.png``). Earlier suffixes win; two masks of equal
    preference for one image, or two images with the same stem, are refused as ambiguous.
    Returns image name -> mask name for the images that have a mask.
    """
    stems: dict[str, str] = {}
    for name in image_names:
        s = stem(name)
        if s in stems:
            raise DatasetError(
                f"images {stems[s]!r} and {name!r} in {where} share the name {s!r}, so their masks cannot be "
                "told apart; rename or remove one of them")
        stems[s] = name
    index = _mask_index(mask_names, suffixes)
    pairs = {}
    for s, name in stems.items():
        candidates = sorted(index.get(s, ()))
        if not candidates:
            continue
        best = [m for rank, m in candidates if rank == candidates[0][0]]
        if len(best) > 1:
            raise DatasetError(
                f"image {name!r} in {where} matches several masks ({', '.join(best)}); keep only one")
        pairs[name] = best[0]
    return pairs


@dataclass(frozen=True)
class Group:
    """One folder of images of one class: its split, specie, label and where its masks are."""

    split: str
    specie: str
    image_dir: str
    anomalous: bool
    mask_dir: str | None = None  # None: the layout has no masks for this folder


def _listing(paths: list[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _refuse_missing_masks(mask_dir: str, missing: list[str], suffixes: tuple[str, ...], can_skip: bool) -> None:
    wanted = " or ".join(f"<name>{s}.<ext>" for s in suffixes)
    or_skip = "; or pass --missing_masks skip to keep them for the image-level loss and metrics only" if can_skip else ""
    raise DatasetError(f"{len(missing)} anomalous image(s) have no mask in {mask_dir} (a mask is named {wanted}): "
                       f"{_listing(missing)}. Add the masks or remove those images{or_skip}")


def build_entries(root: str, cls_name: str, groups: list[Group], suffixes: tuple[str, ...],
                  check_mask_dirs: tuple[str, ...] = (),
                  unmatched_ok: Callable[[str], bool] | None = None,
                  missing_masks: str | None = None) -> dict[str, list[dict]]:
    """Entries of one class per split, masks paired by name, sorted by img_path.

    Refuses an anomalous image without a mask (where its group has a mask folder) and a mask
    without an image, in each mask folder used plus ``check_mask_dirs`` (except masks for which
    ``unmatched_ok(name)`` is true). ``missing_masks``: None where the layout offers no choice,
    "refuse" (the message names ``--missing_masks skip``), or "skip": such images are kept with
    mask_path "" (training uses them for the image-level loss only).
    """
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    users: dict[str, list[tuple[dict, str, str]]] = defaultdict(list)  # mask dir -> (entry, image dir, name)
    for g in groups:
        for name in list_images(root, g.image_dir):
            e = make_entry(join(g.image_dir, name), "", cls_name, g.specie, g.anomalous)
            out[g.split].append(e)
            if g.anomalous and g.mask_dir is not None:
                users[g.mask_dir].append((e, g.image_dir, name))
    for mask_dir in dict.fromkeys([*users, *check_mask_dirs]):
        attach_masks(root, mask_dir, users.get(mask_dir, []), suffixes, unmatched_ok, missing_masks)
    for split in SPLITS:
        out[split].sort(key=lambda e: e["img_path"])
    return out


def attach_masks(root: str, mask_dir: str, items: list[tuple[dict, str, str]], suffixes: tuple[str, ...],
                 unmatched_ok: Callable[[str], bool] | None, missing_masks: str | None = None) -> None:
    """Set ``mask_path`` of each anomalous entry in ``items`` (entry, image dir, image name) to its
    mask in ``mask_dir``; refuses a missing mask, a mask matching two images and a mask without an
    image (except where ``unmatched_ok(name)``). A mask folder no image uses may be absent.
    ``missing_masks="skip"`` keeps images without a mask (mask_path stays "")."""
    if items:
        require_dir(root, mask_dir, f"it must hold the masks of the anomalous images in "
                                    f"{abspath(root, items[0][1])}")
    elif not os.path.isdir(abspath(root, mask_dir)):
        return
    mask_names = list_images(root, mask_dir)
    by_dir: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    for e, image_dir, name in items:
        by_dir[image_dir].append((e, name))
    used: set[str] = set()
    missing: list[str] = []
    for image_dir, pairs_in in by_dir.items():
        pairs = pair_by_name([n for _, n in pairs_in], mask_names, suffixes, abspath(root, image_dir))
        for e, name in pairs_in:
            m = pairs.get(name)
            if m is None:
                missing.append(abspath(root, e["img_path"]))
                continue
            if m in used:
                raise DatasetError(
                    f"mask {abspath(root, join(mask_dir, m))} matches images in two folders "
                    f"(the second is {abspath(root, e['img_path'])}); give the images distinct names")
            used.add(m)
            e["mask_path"] = join(mask_dir, m)
    if missing and missing_masks != "skip":
        _refuse_missing_masks(abspath(root, mask_dir), missing, suffixes, missing_masks is not None)
    orphans = [abspath(root, join(mask_dir, m)) for m in mask_names if m not in used
               and not (unmatched_ok is not None and unmatched_ok(m))]
    if orphans:
        raise DatasetError(
            f"{len(orphans)} mask(s) have no anomalous image of the same name: {_listing(orphans)}. "
            "Restore the images or remove those masks")


# ---------------------------------------------------------------------------- inputs: files, folders, globs
def images_below(folder: Path) -> list[Path]:
    """The files under ``folder``, searched recursively, with an image extension; sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _glob_images(pattern: str) -> list[Path]:
    """A glob pattern's image matches, a matched folder searched recursively; in sorted match order."""
    found: list[Path] = []
    for m in sorted(glob.glob(pattern, recursive=True)):
        mp = Path(m)
        if mp.is_dir():
            found += images_below(mp)
        elif mp.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(mp)
    return found


def expand_image_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given (whatever their extension: the reader then names one it cannot decode);
    folders searched recursively for image extensions; glob patterns expanded. Returns (the files
    in order, without repeats of one absolute path; [(input, NO_SUCH_PATH or NO_IMAGES)] for each
    input that gave none). Each caller words what a missing input means for it."""
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            found = images_below(p)
        elif p.is_file():
            found = [p]
        elif glob.has_magic(inp):
            found = _glob_images(inp)
        else:
            missing.append((inp, NO_SUCH_PATH))
            continue
        if not found:
            missing.append((inp, NO_IMAGES))
        files += found
    first: dict[str, Path] = {}
    for f in files:
        first.setdefault(os.path.abspath(f), f)  # the first of each path kept, in order
    return list(first.values()), missing
