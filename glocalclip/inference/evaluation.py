"""Zero-shot testing (docs/design.md §4, §6): score a dataset class by class and compute the metrics.

Every batch goes through the :class:`~.detector.Detector`, as ``predict`` and ``serve`` do, so the
maps and scores measured here are the ones they give. Text features are computed once per checkpoint. Images are batched, loaded by worker processes,
smoothed on the device, and one class's maps are kept (float32, exact) only until its metrics
are computed. Under torchrun each process scores a shard of every class and rank 0 gathers the
scores and maps for the metrics.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..engine import metrics as M
from ..datasets import AnomalyDataset, collate, default_metrics, load_meta, normalize_image
from ..engine.distributed import DistContext
from .hooks import EvaluationHooks
from ..files import write_json
from ..model.few_shot import ReferenceBank
from ..model.glocalclip import GlocalCLIP
from ..engine.loaders import plan_loader, resolve_batch_size, resolve_num_workers
from ..engine.settings import METRIC_MODES
from .detector import Detector

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_aupro", "pixel_aupro_exact", "pixel_f1max")


@dataclass
class ClassScores:
    """Everything scored for one class, in dataset order."""

    cls_name: str
    img_paths: list[str]
    labels: np.ndarray          # [N]
    scores: np.ndarray          # [N]
    maps: Optional[torch.Tensor] = None   # [N, H, W] float32 (smoothed), on the metrics device
    masks: Optional[torch.Tensor] = None  # [N, H, W] uint8


def evaluation_loader(dataset: AnomalyDataset, batches: list[list[int]], num_workers: int,
                      device: torch.device) -> DataLoader:
    """The loader of testing: the given batches in order, read ahead by worker processes (4 batches
    each, fewer where shared memory is short), pinned for an asynchronous copy when the model is on a GPU."""
    plan = plan_loader(dataset, batches, num_workers, prefetch_factor=4)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                      pin_memory=torch.device(device).type == "cuda", **plan.loader_kwargs())


def metric_keys(mode: str) -> tuple[str, ...]:
    if mode not in METRIC_MODES:
        raise ValueError(f"--metrics must be one of {METRIC_MODES}, got {mode!r}")
    return {"image-level": IMAGE_KEYS, "pixel-level": PIXEL_KEYS,
            "image-pixel-level": PIXEL_KEYS + IMAGE_KEYS}[mode]


class Evaluator:
    """Scores classes of one dataset with one model."""

    def __init__(self, model: GlocalCLIP, ctx: DistContext, sigma: float = 8.0, batch_size: Optional[int] = None,
                 num_workers: Optional[int] = None, progress: bool = True, hooks: Optional[EvaluationHooks] = None,
                 banks: Optional[dict[str, ReferenceBank]] = None):
        """``batch_size``/``num_workers`` None: chosen for the model's device (see ``resources``).
        ``hooks`` hear where the host waits (for the loader, for the device). ``banks``: few-shot,
        one reference bank per class (docs/design.md §11)."""
        self.model = model.eval()
        self.banks = {c: b.to(model.device) for c, b in banks.items()} if banks else None
        self.ctx = ctx
        self.batch_size = resolve_batch_size(batch_size, model.device)
        self.num_workers = resolve_num_workers(num_workers, model.device)
        self.detector = Detector(model, sigma).eval()  # text features once per checkpoint
        self.hooks = hooks or EvaluationHooks()
        self.progress = progress

    def _batches(self, dataset: AnomalyDataset, classes: list[str]) -> list[list[int]]:
        """This rank's batches, class by class (a batch never mixes classes)."""
        batches = []
        for cls_name in classes:
            idx = [i for i, e in enumerate(dataset.entries) if e["cls_name"] == cls_name]
            mine = idx[self.ctx.rank::self.ctx.world_size]
            batches += [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        return batches

    def score_classes(self, dataset: AnomalyDataset, classes: list[str], keep_maps: bool
                      ) -> Iterator[Optional[ClassScores]]:
        """Score the classes in turn with one loader (its workers keep reading ahead while the
        caller computes a finished class's metrics). Yields each class's gathered scores on
        rank 0 (None on other ranks)."""
        batches = self._batches(dataset, classes)
        loader = iter(evaluation_loader(dataset, batches, self.num_workers, self.model.device))
        by_class: dict[str, int] = {c: 0 for c in classes}
        for b in batches:
            by_class[dataset.entries[b[0]]["cls_name"]] += 1
        bar = tqdm(total=len(batches), desc="scoring", leave=False,
                   disable=not (self.progress and self.ctx.is_main))
        for cls_name in classes:
            part = self._score_batches(loader, by_class[cls_name], keep_maps, bar)
            yield self._gather(cls_name, part, keep_maps)
        bar.close()

    def _score_batches(self, loader, n_batches: int, keep_maps: bool, bar) -> dict:
        dev = self.model.device
        order, paths, labels, scores, maps, masks = [], [], [], [], [], []
        with torch.no_grad():
            for _ in range(n_batches):
                with self.hooks.waiting("loader"):
                    batch = next(loader)
                # Nothing in this loop waits for the device (no pageable copies, no host reads), so
                # the next batch is queued while the GPU still works on this one.
                x = batch["image"].to(dev, non_blocking=True)
                if x.dtype == torch.uint8:  # datasets read with as_uint8: normalise on the device
                    x = normalize_image(x)
                bank = self.banks[batch["cls_name"][0]] if self.banks else None  # a batch is one class
                score, amap = self.detector.score_normalized(x, reference=bank)
                order.append(batch["index"])
                paths += batch["img_path"]
                labels.append(batch["label"])
                scores.append(score.float())  # on the device: no per-batch host round trip
                if keep_maps:
                    maps.append(amap)
                    masks.append((batch["mask"].to(dev, non_blocking=True) > 0.5).to(torch.uint8))
                bar.update(1)
        return {"order": torch.cat(order) if order else torch.zeros(0, dtype=torch.long),
                "paths": paths,
                "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                "scores": torch.cat(scores) if scores else torch.zeros(0),  # on the device
                "maps": torch.cat(maps) if maps else None,
                "masks": torch.cat(masks) if masks else None}

    def _gather(self, cls_name: str, part: dict, keep_maps: bool) -> Optional[ClassScores]:
        dev = self.model.device
        with self.hooks.waiting("device"):
            part["scores"] = part["scores"].float().cpu()  # one wait for the device per class
        if self.ctx.enabled:
            for k in ("maps", "masks"):
                if part[k] is not None:
                    part[k] = part[k].cpu()
            parts = self.ctx.gather_objects(part)
            if not self.ctx.is_main:
                return None
        else:
            parts = [part]
        order = torch.cat([p["order"] for p in parts])
        perm = torch.argsort(order)
        paths_all = [p for part_ in parts for p in part_["paths"]]
        out = ClassScores(cls_name=cls_name, img_paths=[paths_all[i] for i in perm.tolist()],
                          labels=torch.cat([p["labels"] for p in parts])[perm].numpy(),
                          scores=torch.cat([p["scores"] for p in parts])[perm].numpy())
        if keep_maps:
            out.maps = torch.cat([p["maps"].to(dev) for p in parts if p["maps"] is not None])[perm.to(dev)]
            out.masks = torch.cat([p["masks"].to(dev) for p in parts if p["masks"] is not None])[perm.to(dev)]
        return out


def class_metrics(scores: ClassScores, mode: str) -> dict[str, float]:
    """The metrics of ``mode`` for one class (NaN where a metric is not defined)."""
    result: dict[str, float] = {}
    if mode in ("image-level", "image-pixel-level"):
        result.update(M.image_metrics(scores.labels, scores.scores))
    if mode in ("pixel-level", "image-pixel-level"):
        result.update(M.pixel_metrics(scores.masks, scores.maps))
    return {k: float(result[k]) for k in metric_keys(mode)}


def mean_metrics(per_class: dict[str, dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """Unweighted mean over classes, skipping classes where a metric is not defined."""
    out = {}
    for k in keys:
        vals = [v[k] for v in per_class.values() if not math.isnan(v[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """The score threshold at which image-level F1 is highest (None if undefined)."""
    if len(np.unique(labels)) < 2:
        return None
    from sklearn.metrics import precision_recall_curve

    p, r, t = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * p * r / (p + r)
    f1 = np.where(np.isfinite(f1), f1, -1)[:-1]
    return float(t[int(np.argmax(f1))]) if len(t) else None


def evaluate(model: GlocalCLIP, data_path: str, dataset: Optional[str], ctx: DistContext,
             mode: Optional[str] = None, sigma: float = 8.0, batch_size: Optional[int] = None,
             num_workers: Optional[int] = None, classes: Optional[list[str]] = None,
             hooks: Optional[EvaluationHooks] = None, progress: bool = True,
             partial_path: Optional[Path] = None, banks: Optional[dict[str, ReferenceBank]] = None
             ) -> Optional[dict[str, Any]]:
    """Score and measure every class; returns the results dict on rank 0, None elsewhere.

    ``hooks`` observe the run (see :class:`EvaluationHooks`: waits, each finished class). With
    ``partial_path``, the classes finished so far are written there after each class, so an
    interrupted run keeps what it measured. ``banks``: few-shot, a reference bank per class."""
    hooks = hooks or EvaluationHooks()
    hooks.run_started()
    data = AnomalyDataset(data_path, split="test", image_size=model.cfg.image_size, classes=classes,
                          dataset=dataset, as_uint8=True)
    if mode is None:
        mode = default_metrics(dataset, load_meta(data_path))
    keys = metric_keys(mode)
    ev = Evaluator(model, ctx, sigma, batch_size, num_workers, progress, hooks, banks)
    per_class: dict[str, dict[str, float]] = {}

    def finish(cs: ClassScores) -> None:
        per_class[cs.cls_name] = class_metrics(cs, mode)
        if partial_path is not None:
            _write_partial(partial_path, {"data_path": str(data_path), "dataset": dataset, "metrics_mode": mode,
                                          "sigma": sigma, "classes": per_class})
        hooks.class_done(cs, per_class[cs.cls_name])

    pooled = measure_classes(ev, data, mode != "image-level" or hooks.needs_maps, finish)
    results = None
    if ctx.is_main:
        per_class = {c: per_class[c] for c in data.classes if c in per_class}
        labels, scores = (np.concatenate(p) for p in pooled)
        results = {"dataset": dataset, "data_path": str(data_path), "metrics_mode": mode, "sigma": sigma,
                   "metric_keys": list(keys), "classes": per_class, "mean": mean_metrics(per_class, keys),
                   "n_images": int(len(labels)), "image_threshold": f1_threshold(labels, scores),
                   "batch_size": ev.batch_size, "num_workers": ev.num_workers, "world_size": ctx.world_size}
    hooks.run_finished()
    return results


def measure_classes(ev: Evaluator, data: AnomalyDataset, keep_maps: bool,
                    finish: Callable[[ClassScores], None]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Score the classes in turn and ``finish`` each (its metrics). A class's metrics (region
    labelling on the CPU, sorting) run in a second thread while the next class is scored; waiting
    for the previous class first keeps at most two classes' maps alive. Returns each class's labels
    and scores (none on ranks other than 0)."""
    pooled_labels: list[np.ndarray] = []
    pooled_scores: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for cs in ev.score_classes(data, data.classes, keep_maps):
            if cs is None:
                continue
            pooled_labels.append(cs.labels)
            pooled_scores.append(cs.scores)
            if pending is not None:
                with ev.hooks.waiting("metrics"):
                    pending.result()  # re-raises the metrics' error
            pending = pool.submit(finish, cs)
            del cs
        if pending is not None:
            with ev.hooks.waiting("metrics"):
                pending.result()
    return pooled_labels, pooled_scores


def _write_partial(path: Path, content: dict[str, Any]) -> None:
    safe = {k: ({c: {m: (None if math.isnan(v) else v) for m, v in r.items()} for c, r in v.items()}
                if k == "classes" else v) for k, v in content.items()}
    write_json(path, safe)
