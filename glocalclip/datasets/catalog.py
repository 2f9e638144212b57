"""Names of the supported datasets: class lists, metric modes and CLI aliases (docs/design.md §7)."""

from __future__ import annotations

from .errors import DatasetError

#: ``--dataset`` name -> class names, in the order of docs/design.md §7.
DATASET_CLASSES: dict[str, tuple[str, ...]] = {
    # industrial
    "mvtec": ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
              "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper"),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
             "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"),
    "mpdd": ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"),
    "btad": ("01", "02", "03"),
    "SDD": ("electrical commutators",),
    "DTD": ("Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068",
            "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069"),
    "DAGM_KaggleUpload": tuple(f"Class{k}" for k in range(1, 11)),
    # medical
    "headct": ("brain",),
    "brain_mri": ("brain",),
    "br35h": ("brain",),
    "covid19": ("chest",),
    "ISIC": ("skin",),
    "clinicdb": ("colon",),
    "colondb": ("colon",),
    "kvasir": ("colon",),
    "endo": ("colon",),
    "tn3k": ("thyroid",),
}

IMAGE_PIXEL = "image-pixel-level"
IMAGE_ONLY = "image-level"
PIXEL_ONLY = "pixel-level"

#: ``--dataset`` name -> default metric mode (docs/design.md §6; DAGM and COVID-19 are extras).
DATASET_METRICS: dict[str, str] = {
    **{name: IMAGE_PIXEL for name in ("mvtec", "visa", "mpdd", "btad", "SDD", "DTD", "DAGM_KaggleUpload")},
    **{name: IMAGE_ONLY for name in ("headct", "brain_mri", "br35h", "covid19")},
    **{name: PIXEL_ONLY for name in ("ISIC", "clinicdb", "colondb", "kvasir", "endo", "tn3k")},
}

#: ``--dataset`` name -> the generate_dataset_json script that prepares it.
DATASET_SCRIPTS: dict[str, str] = {
    "mvtec": "mvtec", "visa": "visa", "mpdd": "mpdd", "btad": "btad", "SDD": "sdd", "DTD": "dtd",
    "DAGM_KaggleUpload": "dagm", "headct": "headct", "brain_mri": "brainmri", "br35h": "br35h",
    "covid19": "covid", "ISIC": "isic", "clinicdb": "clinicdb", "colondb": "colondb",
    "kvasir": "kvasir", "endo": "endo", "tn3k": "tn3k",
}

# Every spelling accepted on a command line, lower-cased -> the canonical name.
_ALIASES: dict[str, str] = {}
for _name, _script in DATASET_SCRIPTS.items():
    _ALIASES[_name.lower()] = _name
    _ALIASES[_script] = _name
_ALIASES.update({"dagm": "DAGM_KaggleUpload", "brainmri": "brain_mri", "br35": "br35h",
                 "covid": "covid19", "head_ct": "headct", "isbi": "ISIC", "endotect": "endo"})


def resolve_dataset_name(name: str) -> str:
    """The canonical ``--dataset`` name for ``name`` (case-insensitive, script names accepted)."""
    canonical = _ALIASES.get(str(name).strip().lower())
    if canonical is None:
        raise DatasetError(
            f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_CLASSES)} "
            "(for your own images, prepared with generate_dataset_json/folder.py, omit --dataset)")
    return canonical


def default_metrics(dataset: str | None, meta: dict | None = None, split: str = "test") -> str:
    """The metric mode for a dataset, or for folder-mode data decided from its meta.json.

    With ``dataset`` given (and known) this is DATASET_METRICS. Otherwise masks present on
    anomalous images give pixel metrics, normal images present give image metrics.
    """
    if dataset is not None:
        return DATASET_METRICS[resolve_dataset_name(dataset)]
    if meta is None:
        raise DatasetError("default_metrics needs a dataset name or the dataset's meta.json")
    entries = [e for lst in meta.get(split, {}).values() for e in lst]
    anomalous = [e for e in entries if int(e["anomaly"]) == 1]
    has_normal = any(int(e["anomaly"]) == 0 for e in entries)
    has_masks = bool(anomalous) and all(e.get("mask_path") for e in anomalous)
    if has_masks and has_normal:
        return IMAGE_PIXEL
    if has_masks:
        return PIXEL_ONLY
    return IMAGE_ONLY
