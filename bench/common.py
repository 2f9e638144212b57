"""What the bench scripts share: model sizes, synthetic data, device clocks, the timing hooks of a
test run and the JSON report. Run the scripts from the repository root as ``python -m bench.NAME``."""
from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from glocalclip import GlocalCLIPConfig
from glocalclip.datasets import write_meta
from glocalclip.datasets.synthetic import SYNTHETIC_CLASSES, make_sample, synthetic_meta
from glocalclip.inference.hooks import WAITS, EvaluationHooks

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
MID_CONFIG = HERE / "mid_clip.json"


def model_config(kind: str, precision: str = "fp32") -> GlocalCLIPConfig:
    """The bench's model sizes, random weights (speed does not depend on their values): ``vitl``
    (ViT-L-14-336 at 518 px, the paper's), ``mid`` (bench/mid_clip.json), ``tiny`` (the test config)."""
    if kind == "vitl":
        return GlocalCLIPConfig(backbone="ViT-L-14-336", pretrained=None, precision=precision)
    if kind == "mid":
        return GlocalCLIPConfig(backbone=str(MID_CONFIG), pretrained=None, features_list=(3, 6, 9, 12),
                                dpam_layer=10, precision=precision)
    return GlocalCLIPConfig(backbone="tiny", pretrained=None, features_list=(2, 4, 6, 8), dpam_layer=6,
                            depth=3, t_n_ctx=2, precision=precision)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock read next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    """GPU memory high-water mark since the last ``reset_peak`` (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timed(fn: Callable[[], Any], repeat: int, device: torch.device = torch.device("cpu")) -> tuple[float, Any]:
    """(best wall seconds over ``repeat`` runs of ``fn``, the last run's result), the device synchronised."""
    best, out = float("inf"), None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {path}")
    return path


def _write_class(root: str, cls_name: str, n: int, size: int, seed: int) -> None:
    """``n`` test images of one class in the MVTec layout, every second one anomalous with its mask."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        anomalous = i % 2 == 1
        specie = "blob" if anomalous else "good"
        folder = Path(root) / cls_name / "test" / specie
        folder.mkdir(parents=True, exist_ok=True)
        img, mask = make_sample(cls_name, size, anomalous, rng, "blob" if anomalous else None)
        Image.fromarray(img).save(folder / f"{i:05d}.png")
        if anomalous:
            masks = Path(root) / cls_name / "ground_truth" / specie
            masks.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(masks / f"{i:05d}_mask.png")


def make_dataset(root: Path, n_images: int, size: int, workers: int) -> Path:
    """A synthetic dataset of ``n_images`` test images over three classes with its meta.json,
    written by up to ``workers`` processes (one class each); read through the real loader."""
    k = len(SYNTHETIC_CLASSES)
    per_class = [n_images // k + (1 if i < n_images % k else 0) for i in range(k)]
    jobs = [(str(root), c, per_class[i], size, 1000 + i) for i, c in enumerate(SYNTHETIC_CLASSES)]
    with ProcessPoolExecutor(max_workers=max(1, min(workers, k))) as pool:
        list(pool.map(_write_class, *zip(*jobs)))
    write_meta(str(root), synthetic_meta(root))
    return root


class TimingHooks(EvaluationHooks):
    """Host clocks at the moments ``evaluate()`` names. The first loader wait is start-up (dataset
    scan, text features, worker start, the first read), which a longer run amortises; after it, a
    high loader wait says loading is the bottleneck, a high device wait that the device is."""

    def __init__(self) -> None:
        self.started: Optional[float] = None
        self.first_batch: Optional[float] = None
        self.finished: Optional[float] = None
        self.seconds = {w: 0.0 for w in WAITS}  # summed over every wait after the first batch
        self.counts = {w: 0 for w in WAITS}

    def run_started(self) -> None:
        self.started = time.perf_counter()

    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        now = time.perf_counter()
        self.counts[what] += 1
        if what == "loader" and self.first_batch is None:
            self.first_batch = now
        else:
            self.seconds[what] += now - t0

    def run_finished(self) -> None:
        self.finished = time.perf_counter()

    def summary(self) -> dict[str, float]:
        """Seconds: ``wall_s`` (the whole ``evaluate()``), ``startup_s`` (to the first batch in
        hand), and the host's waits after it: ``loader_wait_s``, ``device_wait_s``, ``metrics_wait_s``."""
        return {"wall_s": self.finished - self.started, "startup_s": self.first_batch - self.started,
                **{f"{w}_wait_s": s for w, s in self.seconds.items()}}
