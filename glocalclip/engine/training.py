"""Prompt training (docs/design.md §5): Adam on the prompt learner over the auxiliary dataset's
labelled *test* split, the protocol of this line of work.

Same seed, same run: for ``prompt_style="glocal"`` the prompts start where the original code's
start for that seed, and every epoch visits the batches in its ``DataLoader(shuffle=True)``
order (docs/design.md §5.1, :mod:`.original_draws`). The order is a function of (seed, sizes,
epoch) alone, so a run resumed from a checkpoint, a run without the cache, and a run split over
torchrun processes all see the same batches and end with the same prompts.

Speed: the image encoder is frozen and there is no augmentation, so images are encoded once
(first epoch) into a :class:`FeatureCache` and later epochs read the cache.
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..files import append_text, prepare_output_dir, write_json, write_torch
from ..model.checkpoint_format import CheckpointError, read_checkpoint, is_ours
from ..model.config import GlocalCLIPConfig
from ..datasets import AnomalyDataset, collate, load_meta, normalize_image, resolve_dataset_name
from .distributed import DistContext, init_distributed
from .feature_cache import FeatureCache, choose_location
from ..model.losses import glocal_contrastive_loss
from ..model.glocalclip import GlocalCLIP
from ..model.layers import LayerFeatures
from .loaders import plan_loader, resolve_num_workers
from .settings import TrainConfig  # declared with the other settings; imported from here too
from .original_draws import BackboneSizes, OriginalDraws, PromptSizes


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def meta_class_order(root: str, dataset: Optional[str]) -> Optional[list[str]]:
    """The split's classes in meta.json's order: the original concatenated them in that order, so
    its shuffled indices name the same images as ours only in it. None when meta.json lists none
    (the dataset reader then says what is wrong)."""
    meta = load_meta(os.path.abspath(root), resolve_dataset_name(dataset) if dataset is not None else None)
    return [c for c, entries in meta["test"].items() if entries] or None


def shard(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous part of a global batch (ranks may get unequal parts, or none)."""
    return torch.tensor_split(batch, ctx.world_size)[ctx.rank]


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if a file, else the highest ``epoch_N.pth`` inside the folder."""
    p = Path(path)
    if p.is_file():
        return p
    found = _epoch_files(p)
    if not found:
        raise FileNotFoundError(f"--resume {path}: no epoch_N.pth checkpoint there")
    return found[-1]


def _epoch_files(folder: Path) -> list[Path]:
    """The folder's ``epoch_N.pth`` files, lowest N first."""
    return sorted(folder.glob("epoch_*.pth"),
                  key=lambda q: int(q.stem.split("_")[1]) if q.stem.split("_")[1].isdigit() else -1)


def resume_checkpoint(path: str | os.PathLike, warn) -> tuple[Path, dict]:
    """(file, checkpoint dict) that ``--resume path`` continues from: ``path`` itself if a file, else
    the highest ``epoch_N.pth`` in the folder that reads. A damaged later one (truncated, empty: an
    interrupted copy) is passed over with a message through ``warn``; a file named directly is not."""
    p = Path(path)
    if not p.is_dir():
        return p, read_checkpoint(p)
    latest_checkpoint(p)  # no epoch_N.pth at all: FileNotFoundError naming the folder
    damaged = []
    for candidate in reversed(_epoch_files(p)):
        try:
            ckpt = read_checkpoint(candidate)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        for reason in damaged:
            warn(f"--resume: passing over a damaged checkpoint: {reason}")
        if damaged:
            warn(f"--resume: continuing from {candidate}")
        return candidate, ckpt
    raise CheckpointError(f"--resume {path}: no epoch_N.pth there can be read: {'; '.join(damaged)}", "unreadable")


class Trainer:
    """One training run. ``run()`` returns the path of the last checkpoint written."""

    def __init__(self, model_cfg: GlocalCLIPConfig, cfg: TrainConfig, ctx: Optional[DistContext] = None,
                 clip: Optional[torch.nn.Module] = None):
        if not cfg.train_data_path:
            raise ValueError("--train_data_path is required: the root of a dataset with a meta.json")
        self.ctx = ctx or init_distributed(cfg.device)
        self.cfg = cfg
        self.save_dir = Path(cfg.save_path)
        # a save folder that cannot take a file stops the run (every process alike) before any long work
        prepare_output_dir(self.save_dir)
        self.start_epoch = 0
        self.resume_path: Optional[Path] = None
        resume_ckpt = self._resume_checkpoint(model_cfg) if cfg.resume else None
        # the data first: a wrong path fails at once, not after the backbone's weights are loaded
        self.dataset = AnomalyDataset(cfg.train_data_path, split="test", image_size=model_cfg.image_size,
                                      classes=meta_class_order(cfg.train_data_path, cfg.dataset),
                                      dataset=cfg.dataset, as_uint8=True)
        seed_everything(cfg.seed)
        self.device = self.ctx.device
        self.model = GlocalCLIP(model_cfg, clip=clip).to(self.device)
        self.draws = self._replay_original_run(resuming=resume_ckpt is not None)
        self.optimizer = torch.optim.Adam(self.model.prompt_parameters(), lr=cfg.learning_rate,
                                          betas=(0.5, 0.999))
        if resume_ckpt is not None:
            self.model.load_prompts(resume_ckpt)
            if resume_ckpt.get("optimizer"):
                self.optimizer.load_state_dict(resume_ckpt["optimizer"])
        self.prompt_module: torch.nn.Module = self.model.prompt_learner
        if self.ctx.enabled:
            self.prompt_module = torch.nn.parallel.DistributedDataParallel(
                self.model.prompt_learner, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.cache: Optional[FeatureCache] = None
        self.skip_unmasked = cfg.skip_unmasked()
        self.history: list[dict[str, float]] = []

    def _replay_original_run(self, resuming: bool) -> OriginalDraws:
        """The original code's run for this seed (docs/design.md §5.1): a fresh glocal run starts
        from its initial prompts (``anomalyclip`` keeps the prompt learner's own draws), and every
        epoch follows its batch order."""
        model_cfg = self.model.cfg
        draws = OriginalDraws(self.cfg.seed, BackboneSizes.of_clip(self.model.clip), PromptSizes.of_config(model_cfg))
        if model_cfg.prompt_style == "glocal" and not resuming:
            self.model.load_prompts({"prompt_learner": draws.initial_prompts})
        return draws

    def _resume_checkpoint(self, model_cfg: GlocalCLIPConfig) -> dict:
        """Read the checkpoint ``--resume`` names and check it was trained with this model."""
        self.resume_path, resume_ckpt = resume_checkpoint(self.cfg.resume, self.log)
        if not is_ours(resume_ckpt):
            raise ValueError(f"--resume {self.cfg.resume}: not a glocalclip training checkpoint")
        saved = GlocalCLIPConfig.from_dict(resume_ckpt["config"])
        if saved != model_cfg:
            diff = {k: (v, getattr(model_cfg, k)) for k, v in dataclasses.asdict(saved).items()
                    if v != getattr(model_cfg, k) and k not in ("pretrained", "precision")}
            if diff:
                raise ValueError(f"--resume: the checkpoint was trained with other model settings "
                                 f"(checkpoint vs now): {diff}")
        self.start_epoch = int(resume_ckpt["epoch"])
        return resume_ckpt

    # -------------------------------------------------------------- features
    def _loader(self, batches: list[list[int]]) -> DataLoader:
        plan = plan_loader(self.dataset, batches, resolve_num_workers(self.cfg.num_workers, self.device),
                           prefetch_factor=2)  # PyTorch's default read-ahead, scaled down where shared memory is short
        return DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate,
                          pin_memory=self.device.type == "cuda", **plan.loader_kwargs())

    def _encode(self, batch: dict) -> tuple:
        x = normalize_image(batch["image"].to(self.device, non_blocking=True))
        img, layers = self.model.encode_image_layers(x)
        nb = {"non_blocking": True}  # pinned batches: no wait for the device
        return (img, layers, batch["mask"].to(self.device, **nb).float(), batch["label"].to(self.device, **nb),
                batch["has_mask"].to(self.device, **nb))

    def _new_cache(self, img: torch.Tensor, layers: LayerFeatures) -> FeatureCache:
        n = len(self.dataset)
        tokens, width = layers.tensors[0].shape[1:]
        size = self.model.cfg.image_size
        nbytes = FeatureCache.nbytes(n, img.shape[1], tokens, width, len(layers.tensors), size)
        where = choose_location(self.cfg.feature_cache, nbytes, self.device)
        self.log(f"feature cache: {nbytes / 2**30:.2f} GiB in {where} memory")
        return FeatureCache(n, img.shape[1], tokens, width, layers.counts, size, where, self.device,
                            disk_dir=str(self.save_dir))

    def build_cache(self) -> FeatureCache:
        """Encode every training image once, in dataset order (so the features never depend on
        the epoch's batch order, and a resumed run sees bit-identical features). Under torchrun
        each process encodes every K-th chunk, then the chunks are broadcast to all processes."""
        n, bs, ctx = len(self.dataset), self.cfg.batch_size, self.ctx
        chunks = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        mine = chunks[ctx.rank::ctx.world_size]
        cache: Optional[FeatureCache] = None
        bar = tqdm(self._loader(mine), total=len(mine), desc="encoding images", leave=False,
                   disable=not (self.cfg.progress and ctx.is_main))
        for batch in bar:
            img, layers, masks, labels, valid = self._encode(batch)
            if cache is None:
                cache = self._new_cache(img, layers)
            cache.put(batch["index"], img, layers, masks, labels, valid)
        if ctx.enabled:
            cache = self._share_chunks(cache, chunks)
        return cache

    def _share_chunks(self, cache: Optional[FeatureCache], chunks: list[list[int]]) -> FeatureCache:
        """Broadcast each chunk from the process that encoded it to every other process."""
        import torch.distributed as dist

        ctx = self.ctx
        comm = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        if cache is None:  # a process with no chunk of its own (more processes than chunks)
            raise RuntimeError("more torchrun processes than training batches; use fewer processes")
        for j, chunk in enumerate(chunks):
            owner = j % ctx.world_size
            idx = torch.tensor(chunk)
            if ctx.rank == owner:
                rows = cache.read_rows(idx, comm)
            else:
                rows = [torch.empty(shape, dtype=dt, device=comm) for shape, dt in cache.row_shapes(len(chunk))]
            for r in rows:
                dist.broadcast(r, src=owner)
            if ctx.rank != owner:
                cache.write_rows(idx, rows)
        return cache

    def _batches_with_features(self, local_batches: list[torch.Tensor]):
        """Yield (global features, patch features, masks, labels, mask_valid) per batch: from the
        cache, or (``--feature_cache off``) by loading and encoding the batch's images."""
        if self.cache is not None:
            for b in local_batches:
                yield self.cache.get(b) if len(b) else (None,) * 5
            return
        need = [b.tolist() for b in local_batches if len(b)]
        it = iter(self._loader(need)) if need else None
        for b in local_batches:
            if len(b) == 0:
                yield (None,) * 5
                continue
            batch = next(it)
            assert torch.equal(batch["index"], b)
            yield self._encode(batch)

    # -------------------------------------------------------------- steps
    def _step(self, n_global: int, img, patches, masks, labels, valid) -> torch.Tensor:
        """One optimizer step; returns this rank's share of (local, global, contrastive) as a
        device tensor, so that no step waits for the device (summed over ranks per epoch)."""
        model, cfg = self.model, self.cfg
        text = model.encode_text(self.prompt_module())
        if img is None:  # this rank has no sample in a short last batch: contrastive term only
            g, l = text
            con = glocal_contrastive_loss(g, l, cfg.margin)
            zero = con.new_zeros(())
            terms = {"global": zero, "local": zero, "contrastive": con}
            weight = 0.0
        else:
            terms = model.losses_from_features(img, patches, masks, labels, cfg.alpha, cfg.margin,
                                               mask_valid=valid if self.skip_unmasked else None, text=text)
            weight = len(labels) / n_global
        # per-image terms weighted by this rank's share, so DDP's gradient average equals the
        # loss of the whole global batch whatever the split
        scale = weight * self.ctx.world_size
        loss = scale * (terms["local"] + terms["global"]) + cfg.alpha * terms["contrastive"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return torch.stack([weight * terms["local"].detach(), weight * terms["global"].detach(),
                            terms["contrastive"].detach() / self.ctx.world_size]).double()

    def log(self, msg: str) -> None:
        if self.ctx.is_main:
            tqdm.write(msg)
            append_text(self.save_dir / "log.txt", msg + "\n")

    def _save(self, epoch: int, mean: dict[str, float]) -> Path:
        path = self.save_dir / f"epoch_{epoch}.pth"
        if self.ctx.is_main:
            ckpt = self.model.checkpoint(epoch, self.optimizer.state_dict(), train_config=self.cfg.to_dict(),
                                         losses=mean)
            write_torch(path, ckpt)
        self.ctx.barrier()
        return path

    def run(self) -> Optional[Path]:
        cfg = self.cfg
        n = len(self.dataset)
        self.model.train()
        last: Optional[Path] = None
        if self.start_epoch >= cfg.epoch:
            self.log(f"nothing to do: the checkpoint is at epoch {self.start_epoch} of {cfg.epoch}")
            return self.resume_path
        self.log(f"training on {n} images ({len(self.dataset.classes)} classes) of {cfg.train_data_path}, "
                 f"epochs {self.start_epoch + 1}..{cfg.epoch}, batch {cfg.batch_size}, device {self.device}"
                 + (f", {self.ctx.world_size} processes" if self.ctx.enabled else ""))
        try:
            if cfg.feature_cache != "off":
                t0 = time.time()
                self.cache = self.build_cache()
                self.log(f"encoded {n} images once in {time.time() - t0:.1f}s; every epoch reads the cache")
            for epoch in range(self.start_epoch, cfg.epoch):
                t0 = time.time()
                batches = self.draws.epoch_batches(epoch, n, cfg.batch_size)
                local = [shard(b, self.ctx) for b in batches]
                sums = torch.zeros(3, dtype=torch.float64, device=self.device)
                bar = tqdm(zip(batches, self._batches_with_features(local)), total=len(batches),
                           desc=f"epoch {epoch + 1}/{cfg.epoch}", leave=False,
                           disable=not (cfg.progress and self.ctx.is_main))
                for step, (gb, (img, patches, masks, labels, valid)) in enumerate(bar):
                    stats = self._step(len(gb), img, patches, masks, labels, valid)
                    sums += stats
                    if not bar.disable and step % 10 == 0:  # reading a value waits for the device
                        bar.set_postfix(loss=f"{float(stats[:2].sum() + cfg.alpha * stats[2]):.4f}")
                local_sum, glob_sum, con_sum = self.ctx.all_reduce_sum(sums).tolist()
                mean = {"local": local_sum / len(batches), "global": glob_sum / len(batches),
                        "contrastive": con_sum / len(batches)}
                mean["total"] = mean["local"] + mean["global"] + cfg.alpha * mean["contrastive"]
                mean["seconds"] = time.time() - t0
                self.history.append(mean)
                if (epoch + 1) % max(cfg.print_freq, 1) == 0:
                    self.log(f"epoch [{epoch + 1}/{cfg.epoch}] loss {mean['total']:.4f} "
                             f"(local {mean['local']:.4f}, global {mean['global']:.4f}, "
                             f"contrastive {mean['contrastive']:.4f}) {mean['seconds']:.1f}s")
                if (epoch + 1) % max(cfg.save_freq, 1) == 0 or epoch + 1 == cfg.epoch:
                    last = self._save(epoch + 1, mean)
        except KeyboardInterrupt:
            done = latest_checkpoint(self.save_dir) if any(self.save_dir.glob("epoch_*.pth")) else None
            self.log(f"interrupted; the last finished checkpoint is {done}; continue with --resume "
                     f"{self.save_dir}")
            raise
        finally:
            if self.cache is not None:
                self.cache.close()
        if self.ctx.is_main:
            write_json(self.save_dir / "train_history.json", {
                "model_config": self.model.cfg.to_dict(), "train_config": cfg.to_dict(), "epochs": self.history})
        return last


def train(model_cfg: GlocalCLIPConfig, cfg: TrainConfig, clip: Optional[torch.nn.Module] = None) -> Optional[Path]:
    """Train prompts and return the last checkpoint path (see :class:`Trainer`)."""
    ctx = init_distributed(cfg.device)
    try:
        return Trainer(model_cfg, cfg, ctx, clip=clip).run()
    finally:
        ctx.shutdown()
