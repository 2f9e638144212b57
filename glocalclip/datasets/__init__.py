"""Datasets: meta.json generators for every supported layout, and the reader (docs/design.md §5 and §7).

Names are imported on first use, so the torch-free modules (``errors``, ``pixels``) load without torch.
"""

import importlib
from typing import Any

#: public name -> submodule that defines it
_PUBLIC = {
    **dict.fromkeys(("DATASET_CLASSES", "DATASET_METRICS", "DATASET_SCRIPTS", "default_metrics",
                     "resolve_dataset_name"), "catalog"),
    "DatasetError": "errors", "load_meta": "meta", "write_meta": "meta", "prepare_dataset": "generate",
    **dict.fromkeys(("IMAGE_MEAN", "IMAGE_STD", "load_image", "load_mask", "normalize_image"), "preprocess"),
    "AnomalyDataset": "reader", "collate": "reader",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
