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

import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..datasets.preprocess import normalize_image
from ..datasets.reader import AnomalyDataset, collate
from ..files import removed_if_left_empty
from ..model.backbone_record import BackboneRecord
from ..model.config import GlocalCLIPConfig
from ..model.glocalclip import GlocalCLIP
from ..model.losses import glocal_contrastive_loss
from .distributed import DistContext, init_distributed
from .feature_cache import FeatureCache, share_chunks
from .loaders import plan_loader, resolve_num_workers
from .original_draws import BackboneSizes, OriginalDraws, PromptSizes
from .runs import ResumePoint, RunFolder, check_same_data, data_identity, open_run
from .settings import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shard(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous part of a global batch (ranks may get unequal parts, or none)."""
    return torch.tensor_split(batch, ctx.world_size)[ctx.rank]


class Trainer:
    """One training run on a model, its data and its claimed run folder. The constructor only puts
    them together (no file read or written, no wait on other processes); :meth:`prepare` builds all
    of it from the settings, and :meth:`run` trains and returns the path of the last checkpoint."""

    def __init__(self, model: GlocalCLIP, dataset: AnomalyDataset, cfg: TrainConfig, ctx: DistContext,
                 run_folder: RunFolder, draws: OriginalDraws):
        self.model, self.dataset, self.cfg, self.ctx = model, dataset, cfg, ctx
        self.run_folder, self.draws = run_folder, draws
        self.device = ctx.device
        self.optimizer = torch.optim.Adam(model.prompt_parameters(), lr=cfg.learning_rate, betas=(0.5, 0.999))
        self.history: list[dict[str, float]] = []
        self.prompt_module: torch.nn.Module = model.prompt_learner  # wrapped for DDP by prepare()
        self.cache: Optional[FeatureCache] = None
        self.skip_unmasked = cfg.skip_unmasked()

    @classmethod
    def prepare(cls, model_cfg: GlocalCLIPConfig, cfg: TrainConfig, ctx: Optional[DistContext] = None,
                clip: Optional[torch.nn.Module] = None, resume_point: Optional[ResumePoint] = None,
                trust: bool = False) -> "Trainer":
        """The run folder claimed (:func:`.runs.open_run`), the data, the model seeded as the original's
        run for this seed, and a resumed run's state, in the order that fails fastest: a wrong path
        before the backbone's weights load. ``trust``: load ``--resume`` / ``--pretrained`` files that
        could run code (``--trust_checkpoint``)."""
        if not cfg.train_data_path:
            raise ValueError("--train_data_path is required: the root of a dataset with a meta.json")
        ctx = ctx or init_distributed(cfg.device)
        run_folder, resumed = open_run(cfg, model_cfg, ctx, resume_point, trust)
        # classes in meta.json's order: the original concatenated them so, and its shuffled indices
        # name the same images as ours only in that order
        dataset = AnomalyDataset(cfg.train_data_path, split="test", image_size=model_cfg.image_size,
                                 dataset=cfg.dataset, as_uint8=True, meta_order=True)
        check_same_data(resumed, dataset, cfg.train_data_path)
        seed_everything(cfg.seed)
        # a resumed run rebuilds the backbone its checkpoint records, not what --backbone names today
        recorded = BackboneRecord.of_checkpoint(resumed, {}) if resumed is not None and clip is None else None
        model = GlocalCLIP(model_cfg, clip=clip, backbone=recorded, trust=trust).to(ctx.device)
        # the original's run for this seed (docs/design.md §5.1): a fresh glocal run starts from its
        # initial prompts (``anomalyclip`` keeps the prompt learner's own draws); every epoch follows
        # its batch order
        draws = OriginalDraws(cfg.seed, BackboneSizes.of_clip(model.clip), PromptSizes.of_config(model_cfg))
        if model_cfg.prompt_style == "glocal" and resumed is None:
            model.load_prompts({"prompt_learner": draws.initial_prompts})
        trainer = cls(model, dataset, cfg, ctx, run_folder, draws)
        if resumed is not None:
            trainer.restore(resumed)
        if ctx.enabled:  # DDP's constructor waits for every process
            trainer.prompt_module = torch.nn.parallel.DistributedDataParallel(
                model.prompt_learner, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        return trainer

    def restore(self, ckpt: dict) -> None:
        """The prompts, the optimizer's state and the loss history of the checkpoint resumed from.
        The restored optimizer state carries the learning rate it was saved with: this run's rate
        (the checkpoint's unless --learning_rate gave another) holds from the next step on."""
        self.model.load_prompts(ckpt)
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.learning_rate
        start = self.run_folder.start_epoch
        self.history = [h for h in ckpt.get("history", []) if h.get("epoch", 0) <= start]

    @property
    def start_epoch(self) -> int:
        return self.run_folder.start_epoch

    @property
    def save_dir(self) -> Path:
        return self.run_folder.path

    def log(self, msg: str) -> None:
        self.run_folder.log(msg)

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
                cache = FeatureCache.sized_for(len(self.dataset), img, layers, self.model.cfg.image_size,
                                               self.cfg.feature_cache, self.device, str(self.save_dir), self.log)
            cache.put(batch["index"], img, layers, masks, labels, valid)
        if ctx.enabled:
            cache = share_chunks(cache, chunks, ctx)
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

    def _save(self, epoch: int, mean: dict[str, float]) -> Path:
        """``epoch_N.pth``, self-contained: the model's config and backbone, the settings as they hold
        now, every resume with what it changed, the data's identity, the losses so far."""
        run = self.run_folder
        path = run.save(epoch, lambda: self.model.checkpoint(
            epoch, self.optimizer.state_dict(), train_config=self.cfg.to_dict(), losses=mean, resumes=run.resumes,
            data=data_identity(self.dataset), history=self.history),
            self.model.cfg.to_dict(), self.cfg.to_dict(), self.history)
        self.ctx.barrier()
        return path

    def _epoch(self, epoch: int) -> dict[str, float]:
        """One epoch over the original's batch order for it; the mean losses over its batches."""
        cfg, t0 = self.cfg, time.time()
        batches = self.draws.epoch_batches(epoch, len(self.dataset), cfg.batch_size)
        local = [shard(b, self.ctx) for b in batches]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        bar = tqdm(zip(batches, self._batches_with_features(local)), total=len(batches),
                   desc=f"epoch {epoch + 1}/{cfg.epoch}", leave=False, disable=not (cfg.progress and self.ctx.is_main))
        for step, (gb, (img, patches, masks, labels, valid)) in enumerate(bar):
            stats = self._step(len(gb), img, patches, masks, labels, valid)
            sums += stats
            if not bar.disable and step % 10 == 0:  # reading a value waits for the device
                bar.set_postfix(loss=f"{float(stats[:2].sum() + cfg.alpha * stats[2]):.4f}")
        local_sum, glob_sum, con_sum = self.ctx.all_reduce_sum(sums).tolist()
        mean = {"epoch": epoch + 1, "local": local_sum / len(batches), "global": glob_sum / len(batches),
                "contrastive": con_sum / len(batches)}
        mean["total"] = mean["local"] + mean["global"] + cfg.alpha * mean["contrastive"]
        mean["seconds"] = time.time() - t0
        return mean

    def run(self) -> Optional[Path]:
        cfg = self.cfg
        n = len(self.dataset)
        self.model.train()
        last: Optional[Path] = None
        if self.start_epoch >= cfg.epoch:
            self.log(f"nothing to do: the checkpoint is at epoch {self.start_epoch} of {cfg.epoch}")
            return self.run_folder.resume_path
        self.log(f"training on {n} images ({len(self.dataset.classes)} classes) of {cfg.train_data_path}, "
                 f"epochs {self.start_epoch + 1}..{cfg.epoch}, batch {cfg.batch_size}, device {self.device}"
                 + (f", {self.ctx.world_size} processes" if self.ctx.enabled else ""))
        try:
            if cfg.feature_cache != "off":
                t0 = time.time()
                self.cache = self.build_cache()
                self.log(f"encoded {n} images once in {time.time() - t0:.1f}s; every epoch reads the cache")
            for epoch in range(self.start_epoch, cfg.epoch):
                mean = self._epoch(epoch)
                self.history.append(mean)
                if (epoch + 1) % max(cfg.print_freq, 1) == 0:
                    self.log(f"epoch [{epoch + 1}/{cfg.epoch}] loss {mean['total']:.4f} "
                             f"(local {mean['local']:.4f}, global {mean['global']:.4f}, "
                             f"contrastive {mean['contrastive']:.4f}) {mean['seconds']:.1f}s")
                if (epoch + 1) % max(cfg.save_freq, 1) == 0 or epoch + 1 == cfg.epoch:
                    last = self._save(epoch + 1, mean)
        except KeyboardInterrupt:
            done = self.run_folder.last_checkpoint()
            self.log(f"interrupted; the last finished checkpoint is {done}; continue with --resume "
                     f"{self.save_dir}")
            raise
        finally:
            if self.cache is not None:
                self.cache.close()
        return last  # the last epoch always saves, and with it train_history.json


def train(model_cfg: GlocalCLIPConfig, cfg: TrainConfig, clip: Optional[torch.nn.Module] = None,
          resume_point: Optional[ResumePoint] = None, trust: bool = False) -> Optional[Path]:
    """Train prompts and return the last checkpoint path (see :class:`Trainer`; ``resume_point``:
    ``--resume``'s checkpoint when the caller read it already; ``trust``: ``--trust_checkpoint``)."""
    ctx = init_distributed(cfg.device)
    try:
        with removed_if_left_empty(cfg.save_path):  # a failed start (no weights, bad data) leaves no empty folder
            return Trainer.prepare(model_cfg, cfg, ctx, clip=clip, resume_point=resume_point, trust=trust).run()
    finally:
        ctx.shutdown()
