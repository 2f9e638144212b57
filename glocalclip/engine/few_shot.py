"""Few-shot's reference images (docs/design.md §11): for testing, K normal images per class drawn from
meta.json's train split by a seed, and the per-class banks built from them; for predict, serve and
export, the bank of ``--reference DIR|GLOB`` (or of a bank file saved earlier).

The draw depends only on (seed, class name, the class's train normals): every torchrun process,
any subset of ``--classes`` and any later run draw the same shots.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..datasets import AnomalyDataset, DatasetError, normalize_image
from ..datasets.pixels import decoded, exif_upright, open_image, resized_rgb
from ..datasets.scan import NO_SUCH_PATH, expand_image_inputs
from ..model.config import FewShotSettings, is_bank_name
from ..model.few_shot import ReferenceBank
from ..model.glocalclip import GlocalCLIP
from ..settings import SettingError, template_literal


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


# ---------------------------------------------------------------------------- predict/serve/export: --reference
REFERENCE_FIX = "give --reference a folder or glob of normal images, or a bank saved with --save_reference"


def reference_files(spec: str) -> list[Path]:
    """The images of ``--reference DIR|GLOB|FILE`` (``datasets.scan.expand_image_inputs``, predict's
    expansion of its inputs): a folder searched recursively for image files, a glob pattern expanded
    (folders it matches searched too), or one image; absolute, without repeats."""
    files, missing = expand_image_inputs([spec])
    for _, why in missing:
        error = FileNotFoundError if why == NO_SUCH_PATH else DatasetError
        raise error(f"--reference {spec}: {why}; {REFERENCE_FIX}")
    return [Path(os.path.abspath(f)) for f in files]


def reference_pixels(files: Sequence[Path], image_size: int) -> torch.Tensor:
    """The reference images as the model sees a predicted image: EXIF-upright, PIL bicubic to S x S,
    RGB -> uint8 [K, 3, S, S]. An unreadable file is refused by name (a bank must not silently shrink)."""
    pixels = []
    for f in files:
        with open_image(os.fspath(f), "reference image", fix="or remove it from --reference") as im:
            pixels.append(resized_rgb(exif_upright(decoded(im, "reference image", "or remove it from --reference")),
                                      image_size))
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


#: the few-shot settings asked for: all of them (a FewShotSettings), or only the fields chosen (a
#: mapping, as a command line gives them), or None (the defaults, or a saved bank's own)
FewShotChoice = Optional[Union[FewShotSettings, Mapping[str, Any]]]


def chosen_fields(settings: FewShotChoice) -> dict[str, Any]:
    """The fields of ``settings`` that were asked for, checked (an unknown name or a bad value refused)."""
    if settings is None:
        return {}
    if isinstance(settings, FewShotSettings):
        return settings.to_dict()
    FewShotSettings(**settings)  # checks the names and values
    return dict(settings)


def load_reference(model: GlocalCLIP, spec: str, settings: FewShotChoice = None,
                   batch_size: int = 8, progress: bool = False) -> ReferenceBank:
    """The bank of ``--reference``: a saved bank (checked against the model; it keeps the few-shot
    settings it was built with, and refuses a field of ``settings`` asked for that differs), or one
    built from the images of a folder or glob on the model's device (``settings`` asked for, the
    defaults for the rest)."""
    chosen = chosen_fields(settings)
    p = Path(spec)
    if p.is_file() and is_bank_name(p):
        bank = ReferenceBank.load(p)
        bank.check_fits(model.cfg)
        stored = bank.settings.to_dict()
        differ = [k for k, v in chosen.items() if v != stored[k]]
        if differ:
            what = ", ".join(f"{{{k}}} {stored[k]} (not {chosen[k]})" for k in differ)
            raise SettingError(differ[0], f"--reference {template_literal(spec)} is a saved bank built with {what}: "
                                          f"leave {' '.join(f'{{{k}}}' for k in differ)} out to score with the "
                                          "bank's, or build the bank again from the images", also=differ[1:])
        return bank.to(model.device)
    files = reference_files(spec)
    x = reference_pixels(files, model.cfg.image_size).to(model.device)
    with torch.no_grad():
        return model.reference_bank(normalize_image(x), FewShotSettings(**chosen),
                                    sources=[os.fspath(f) for f in files], batch_size=batch_size)

