"""Datasets: meta.json generators for every supported layout, and the reader (docs/design.md §5 and §7)."""

from .catalog import DATASET_CLASSES, DATASET_METRICS, DATASET_SCRIPTS, default_metrics, resolve_dataset_name
from .errors import DatasetError
from .meta import load_meta, write_meta
from .generate import prepare_dataset
from .preprocess import IMAGE_MEAN, IMAGE_STD, load_image, load_mask, normalize_image
from .reader import AnomalyDataset, collate

__all__ = [
    "DATASET_CLASSES", "DATASET_METRICS", "DATASET_SCRIPTS", "IMAGE_MEAN", "IMAGE_STD", "AnomalyDataset",
    "DatasetError", "collate", "default_metrics", "load_image", "load_mask", "load_meta", "normalize_image", "prepare_dataset",
    "resolve_dataset_name", "write_meta",
]
