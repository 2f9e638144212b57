"""The settings of a training run and of a test run, declared once (see ``glocalclip/settings.py``):
the command lines of ``train.py`` and ``test.py`` are generated from these fields. No torch here,
so ``--help`` answers at once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..settings import check_settings, setting

PAPER_SIGMA = 8.0  # the test protocol's Gaussian σ (docs/design.md §4); the original CLI defaulted to 4

FEATURE_CACHE_PLACES = ("auto", "device", "host", "disk", "off")
UNMASKED_ANOMALY_MODES = ("auto", "skip", "zero")
METRIC_MODES = ("image-level", "pixel-level", "image-pixel-level")


# ---------------------------------------------------------------- fields shared by several commands
def dataset_setting() -> Any:
    return setting(None, help="dataset name (mvtec, visa, ...); omit it for folder-mode data",
                   default_text="none: folder-mode data")


def device_setting() -> Any:
    return setting(None, help="cuda, cuda:1, cpu", default_text="a GPU if present")


def workers_setting() -> Any:
    return setting(None, parse=int, minimum=0, metavar="N",
                   help="loader worker processes; 0 loads in the main process",
                   default_text="from the device and the CPU cores: on a GPU the cores minus 2, at most 12; "
                                "on a CPU 1")


def progress_setting() -> Any:
    return setting(True, flag="no_progress", switch=False, help="hide the progress bars")


def canonical_dataset(name: Optional[str]) -> Optional[str]:
    """The canonical ``--dataset`` name (unknown names are refused with the valid ones)."""
    if name is None:
        return None
    from ..datasets.catalog import resolve_dataset_name

    return resolve_dataset_name(name)


# ---------------------------------------------------------------- training
def unmasked_mode(setting_value: str, dataset: Optional[str]) -> str:
    """``--unmasked_anomalies`` as it acts: ``auto`` is skip for folder-mode data (no ``--dataset``),
    zero (the original's all-normal target) for a named dataset."""
    if setting_value == "auto":
        return "skip" if dataset is None else "zero"
    return setting_value


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model (the model is ``GlocalCLIPConfig``);
    defaults are the paper's protocol (docs/design.md §5)."""

    train_data_path: str = setting("", required=True, help="dataset root holding meta.json")
    dataset: Optional[str] = dataset_setting()
    save_path: str = setting("./checkpoints/run", help="folder for epoch_N.pth, log.txt and train_history.json")
    batch_size: int = setting(8, minimum=1, help="images per optimizer step")
    epoch: int = setting(15, minimum=1, help="epochs to train")
    learning_rate: float = setting(1e-3, help="Adam's learning rate")
    alpha: float = setting(1.0, help="weight of the glocal contrastive loss")
    margin: float = setting(0.0, help="margin of the glocal contrastive loss")
    seed: int = setting(111, help="the original code's run for this seed: its initial prompts (glocal style) and its "
                                    "batch order every epoch, replayed from its random draws")
    print_freq: int = setting(1, help="log the losses every N epochs")
    save_freq: int = setting(1, help="write a checkpoint every N epochs (and after the last)")
    device: Optional[str] = device_setting()
    feature_cache: str = setting("auto", choices=FEATURE_CACHE_PLACES,
                                 help="where the image features encoded in the first epoch are kept; off "
                                      "encodes every epoch; auto picks by free memory")
    num_workers: Optional[int] = workers_setting()
    resume: Optional[str] = setting(None, help="a checkpoint, or a save folder (its latest epoch), to continue; "
                                               "settings not given are the checkpoint's",
                                    default_text="start afresh")
    overwrite: bool = setting(False, switch=True,
                              help="start afresh in a --save_path that holds an earlier run: its epoch_N.pth (with their "
                                   "threshold files), train_history.json and log.txt are removed first")
    progress: bool = progress_setting()
    unmasked_anomalies: str = setting(
        "auto", choices=UNMASKED_ANOMALY_MODES,
        help="anomalous images without a mask: zero = all-normal target (original), skip = no local loss "
             "for them; auto = zero for a named --dataset, skip for folder-mode data")

    def __post_init__(self) -> None:
        check_settings(self)
        self.dataset = canonical_dataset(self.dataset)

    def skip_unmasked(self) -> bool:
        return unmasked_mode(self.unmasked_anomalies, self.dataset) == "skip"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- testing
@dataclass
class TestConfig:
    """Everything about a test run other than which model and how to run it (checkpoint, σ, device,
    batch size: ``inference.settings.ModelSettings``, shared with predict, serve and export)."""

    __test__ = False  # not a pytest test class

    data_path: str = setting("", required=True, help="dataset root holding meta.json")
    dataset: Optional[str] = dataset_setting()
    save_path: str = setting("./results/run", help="folder for results.json/.csv/.md and vis/")
    metrics: Optional[str] = setting(None, choices=METRIC_MODES, help="which metrics",
                                     default_text="per dataset as in the paper")
    num_workers: Optional[int] = workers_setting()
    classes: Optional[list[str]] = setting(None, nargs="+", help="test only these classes",
                                           default_text="every class")
    save_vis: bool = setting(False, switch=True, help="write heat-map grids and curves to SAVE_PATH/vis")
    progress: bool = progress_setting()
    shots: int = setting(0, minimum=0, metavar="K",
                         help="few-shot: K normal images per class from meta.json's train split sharpen the "
                              "zero-shot map (docs/design.md §11); 0 is zero-shot")
    shot_seed: int = setting(0, help="which K shots are drawn (the same on every process and every run)")

    def __post_init__(self) -> None:
        check_settings(self)
        self.dataset = canonical_dataset(self.dataset)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
