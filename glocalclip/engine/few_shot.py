"""Few-shot testing's shots (docs/design.md §11): K normal images per class, drawn from meta.json's
train split by a seed, and the per-class reference banks built from them.

The draw depends only on (seed, class name, the class's train normals): every torchrun process,
any subset of ``--classes`` and any later run draw the same shots.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np
import torch

from ..datasets import AnomalyDataset, DatasetError, normalize_image
from ..model.few_shot import FewShotSettings, ReferenceBank
from ..model.glocalclip import GlocalCLIP


def draw_shots(train_split: dict[str, list[dict]], classes: Sequence[str], shots: int, seed: int,
               data_path: str = "the dataset") -> dict[str, list[str]]:
    """``shots`` normal image paths per class (meta.json's relative paths), drawn without
    replacement from the class's train normals sorted by path, by a generator seeded with
    (``seed``, CRC-32 of the class name). Refuses a class with fewer than ``shots`` train normals."""
    if shots < 1:
        raise ValueError(f"--shots must be >= 1 to draw shots, got {shots}")
    drawn: dict[str, list[str]] = {}
    missing, short = [], []
    for cls_name in classes:
        normals = sorted(e["img_path"] for e in train_split.get(cls_name, []) if int(e["anomaly"]) == 0)
        if not normals:
            missing.append(cls_name)
            continue
        if len(normals) < shots:
            short.append(f"{cls_name} ({len(normals)})")
            continue
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(cls_name.encode("utf-8"))])
        pick = sorted(rng.choice(len(normals), size=shots, replace=False).tolist())
        drawn[cls_name] = [normals[i] for i in pick]
    if missing:
        raise DatasetError(
            f"--shots needs normal images in the train split of {data_path}/meta.json, and class(es) "
            f"{', '.join(map(repr, missing))} have none there. Few-shot testing draws its reference images "
            "from the train split that the MVTec and VisA layouts have (generate_dataset_json writes it); "
            "for folder data, test with --shots 0, or score with `glocalclip predict --reference DIR`")
    if short:
        raise DatasetError(f"--shots {shots} needs {shots} train normals per class; {', '.join(short)} "
                           f"have fewer in {data_path}/meta.json: use a smaller --shots")
    return drawn


def class_banks(model: GlocalCLIP, data_path: str, dataset: Optional[str], shots: dict[str, list[str]],
                settings: FewShotSettings, batch_size: int = 8) -> dict[str, ReferenceBank]:
    """One bank per class from its drawn shots, read as the test images are (same resize and
    normalisation), on the model's device."""
    data = AnomalyDataset(data_path, split="train", image_size=model.cfg.image_size, classes=sorted(shots),
                          dataset=dataset, as_uint8=True)
    index = {e["img_path"]: i for i, e in enumerate(data.entries)}
    banks = {}
    for cls_name, paths in shots.items():
        with torch.no_grad():
            x = torch.stack([data[index[p]]["image"] for p in paths]).to(model.device)
            x = normalize_image(x) if x.dtype == torch.uint8 else x
            banks[cls_name] = model.reference_bank(x, settings, sources=paths, batch_size=batch_size)
    return banks
