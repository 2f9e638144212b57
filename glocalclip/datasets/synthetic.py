"""Synthetic industrial anomaly data: textured surfaces with pasted defects and exact masks.

Used by the demo and the tests, so that the whole pipeline runs with no dataset download. Each
class is a procedural texture (stripes, checker, noise) in its own colours; a defect is a blob
or a scratch painted in a contrasting colour, and its mask is exactly the painted pixels.
``write_mvtec_layout`` writes the MVTec AD on-disk layout (docs/design.md §7).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

SYNTHETIC_CLASSES = ("stripes", "checker", "grain")
DEFECT_TYPES = ("blob", "scratch")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def texture(cls_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A defect-free surface of class ``cls_name``: uint8 [size, size, 3]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = _smooth_noise(rng, size, 6)
    phase = rng.random() * 2 * np.pi
    if cls_name == "stripes":
        base = 0.5 + 0.35 * np.sin(2 * np.pi * 8 * (xx + 0.15 * yy) + phase)
        colour = np.array([0.55, 0.6, 0.75])
    elif cls_name == "checker":
        k = 6
        base = ((np.floor(xx * k + phase) + np.floor(yy * k)) % 2) * 0.4 + 0.3
        colour = np.array([0.7, 0.65, 0.5])
    else:
        base = 0.35 + 0.5 * _smooth_noise(rng, size, 24)
        colour = np.array([0.5, 0.7, 0.55])
    grey = np.clip(0.85 * base + 0.15 * noise, 0, 1)
    rgb = grey[..., None] * colour[None, None, :] + 0.1 * rng.random((size, size, 3))
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def defect_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean defect region covering roughly 2–8 % of the image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.2, 0.8, size=2) * size
    if kind == "blob":
        r = rng.uniform(0.08, 0.14) * size
        wobble = 1 + 0.25 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(2, 5) + rng.random() * 6)
        return ((yy - cy) ** 2 + (xx - cx) ** 2) < (r * wobble) ** 2
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.3, 0.5) * size
    width = rng.uniform(0.03, 0.05) * size
    dx, dy = np.cos(angle), np.sin(angle)
    along = (xx - cx) * dx + (yy - cy) * dy
    across = -(xx - cx) * dy + (yy - cy) * dx
    return (np.abs(along) < length / 2) & (np.abs(across) < width / 2)


def paste_defect(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint the masked pixels in a colour far from the surface's mean colour."""
    out = image.astype(np.float32)
    mean = out.reshape(-1, 3).mean(0)
    colour = np.where(mean > 127, rng.uniform(0, 40, 3), rng.uniform(215, 255, 3))
    grain = rng.normal(0, 12, size=out.shape)
    out[mask] = colour + grain[mask]
    return np.clip(out, 0, 255).astype(np.uint8)


def make_sample(cls_name: str, size: int, anomalous: bool, rng: np.random.Generator,
                kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [S,S,3], mask bool [S,S]) pair; the mask is empty for normal samples."""
    img = texture(cls_name, size, rng)
    if not anomalous:
        return img, np.zeros((size, size), dtype=bool)
    kind = kind or DEFECT_TYPES[int(rng.integers(len(DEFECT_TYPES)))]
    mask = defect_mask(kind, size, rng)
    return paste_defect(img, mask, rng), mask


def write_mvtec_layout(root: str | Path, classes: Sequence[str] = SYNTHETIC_CLASSES, n_train: int = 4,
                       n_test_good: int = 6, n_test_defect: int = 6, size: int = 128, seed: int = 0) -> Path:
    """Write a synthetic dataset in MVTec AD's layout:
    ``R/cls/train/good/000.png``, ``R/cls/test/{good,blob,scratch}/000.png``,
    ``R/cls/ground_truth/{blob,scratch}/000_mask.png``. Returns the root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls_name in classes:
        for split, n in (("train", n_train), ("test", n_test_good)):
            d = root / cls_name / split / "good"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, _ = make_sample(cls_name, size, False, rng)
                Image.fromarray(img).save(d / f"{i:03d}.png")
        for k, kind in enumerate(DEFECT_TYPES):
            n = n_test_defect // len(DEFECT_TYPES) + (1 if k < n_test_defect % len(DEFECT_TYPES) else 0)
            d = root / cls_name / "test" / kind
            g = root / cls_name / "ground_truth" / kind
            d.mkdir(parents=True, exist_ok=True)
            g.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img, m = make_sample(cls_name, size, True, rng, kind)
                Image.fromarray(img).save(d / f"{i:03d}.png")
                Image.fromarray(m.astype(np.uint8) * 255).save(g / f"{i:03d}_mask.png")
    return root


def synthetic_meta(root: str | Path) -> dict:
    """meta.json contents for a tree written by :func:`write_mvtec_layout` (classes are the
    synthetic ones, so the MVTec class list does not apply); masks paired by name."""
    root = Path(root)
    meta: dict = {"train": {}, "test": {}}
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for split in ("train", "test"):
            entries = []
            for img in sorted((cls_dir / split).glob("*/*.png")):
                specie = img.parent.name
                anomalous = specie != "good"
                mask = cls_dir / "ground_truth" / specie / f"{img.stem}_mask.png"
                entries.append({"img_path": img.relative_to(root).as_posix(),
                                 "mask_path": mask.relative_to(root).as_posix() if anomalous else "",
                                 "cls_name": cls_dir.name, "specie_name": specie, "anomaly": int(anomalous)})
            if entries:
                meta[split][cls_dir.name] = sorted(entries, key=lambda e: e["img_path"])
    return meta


def make_synthetic_dataset(root: str | Path, **kwargs) -> Path:
    """Write the synthetic MVTec-layout tree and its meta.json; returns the root."""
    from .meta import write_meta

    root = write_mvtec_layout(root, **kwargs)
    write_meta(str(root), synthetic_meta(root))
    return root
