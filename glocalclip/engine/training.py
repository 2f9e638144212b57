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
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..files import append_text, prepare_output_dir, write_json, write_torch
from ..model.backbone_record import BackboneRecord
from ..model.checkpoint_format import is_ours
from ..model.config import GlocalCLIPConfig
from ..datasets import AnomalyDataset, collate, normalize_image
from .distributed import DistContext, init_distributed
from .feature_cache import FeatureCache, choose_location
from ..model.losses import glocal_contrastive_loss
from ..model.glocalclip import GlocalCLIP
from ..model.layers import LayerFeatures
from .loaders import plan_loader, resolve_num_workers
from .settings import TrainConfig  # declared with the other settings; imported from here too
from .original_draws import BackboneSizes, OriginalDraws, PromptSizes
from .resume_settings import resume_changes, resume_entry
from .runs import ResumePoint, claim_save_folder, epoch_files


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shard(batch: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's contiguous part of a global batch (ranks may get unequal parts, or none)."""
    return torch.tensor_split(batch, ctx.world_size)[ctx.rank]


class Trainer:
    """One training run. ``run()`` returns the path of the last checkpoint written."""

    def __init__(self, model_cfg: GlocalCLIPConfig, cfg: TrainConfig, ctx: Optional[DistContext] = None,
                 clip: Optional[torch.nn.Module] = None, resume_point: Optional[ResumePoint] = None,
                 trust: bool = False):
        if not cfg.train_data_path:
            raise ValueError("--train_data_path is required: the root of a dataset with a meta.json")
        self.ctx = ctx or init_distributed(cfg.device)
        self.cfg = cfg
        self.save_dir = Path(cfg.save_path)
        # a save folder that cannot take a file stops the run (every process alike) before any long work
        prepare_output_dir(self.save_dir)
        self.trust = trust  # load --resume / --pretrained files that could run code (--trust_checkpoint)
        resume_ckpt = self._open_run(model_cfg, resume_point)
        # the data first: a wrong path fails at once, not after the backbone's weights are loaded;
        # classes in meta.json's order: the original concatenated them so, and its shuffled indices
        # name the same images as ours only in that order
        self.dataset = AnomalyDataset(cfg.train_data_path, split="test", image_size=model_cfg.image_size,
                                      dataset=cfg.dataset, as_uint8=True, meta_order=True)
        self._check_same_data(resume_ckpt)
        seed_everything(cfg.seed)
        self.device = self.ctx.device
        # a resumed run rebuilds the backbone its checkpoint records, not what --backbone names today
        recorded = BackboneRecord.of_checkpoint(resume_ckpt, {}) if resume_ckpt is not None and clip is None else None
        self.model = GlocalCLIP(model_cfg, clip=clip, backbone=recorded, trust=trust).to(self.device)
        self.draws = self._replay_original_run(resuming=resume_ckpt is not None)
        self.optimizer = torch.optim.Adam(self.model.prompt_parameters(), lr=cfg.learning_rate,
                                          betas=(0.5, 0.999))
        self.history: list[dict[str, float]] = []
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self.prompt_module: torch.nn.Module = self.model.prompt_learner
        if self.ctx.enabled:
            self.prompt_module = torch.nn.parallel.DistributedDataParallel(
                self.model.prompt_learner, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.cache: Optional[FeatureCache] = None
        self.skip_unmasked = cfg.skip_unmasked()

    def _replay_original_run(self, resuming: bool) -> OriginalDraws:
        """The original code's run for this seed (docs/design.md §5.1): a fresh glocal run starts
        from its initial prompts (``anomalyclip`` keeps the prompt learner's own draws), and every
        epoch follows its batch order."""
        model_cfg = self.model.cfg
        draws = OriginalDraws(self.cfg.seed, BackboneSizes.of_clip(self.model.clip), PromptSizes.of_config(model_cfg))
        if model_cfg.prompt_style == "glocal" and not resuming:
            self.model.load_prompts({"prompt_learner": draws.initial_prompts})
        return draws

    # -------------------------------------------------------------- one folder, one run
    def _open_run(self, model_cfg: GlocalCLIPConfig, point: Optional[ResumePoint]) -> Optional[dict]:
        """Take the checkpoint ``--resume`` names (``point`` if the caller read it already), then claim
        the save folder for this run: a folder holding another run's checkpoints is refused, or
        cleared with ``--overwrite`` (by rank 0, the others waiting for it)."""
        self.start_epoch, self.resume_path, self.resumes = 0, None, []
        notes: list[str] = []  # logged once the folder is this run's
        ckpt = None
        if self.cfg.resume:
            point = point or ResumePoint.read(self.cfg.resume, self.trust)
            notes += point.notes
            ckpt = self._check_resume(model_cfg, point, notes.append)
        named_file = self.cfg.resume is not None and not Path(self.cfg.resume).is_dir()
        removed = claim_save_folder(self.save_dir, self.resume_path, self.cfg.overwrite, resume_named_file=named_file,
                                    clear=self.ctx.is_main)
        self.ctx.barrier()
        if removed:
            notes.insert(0, f"--overwrite: removed the earlier run's files from {self.save_dir}: "
                            f"{', '.join(p.name for p in removed)}")
        for note in notes:
            self.log(note)
        return ckpt

    def _check_resume(self, model_cfg: GlocalCLIPConfig, point: ResumePoint, note) -> dict:
        """Check the checkpoint ``--resume`` continues from was trained with this model and these
        settings (docs/design.md §5), and record what this run changes from its next epoch on."""
        self.resume_path, resume_ckpt = point.path, point.checkpoint
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
        changes = resume_changes(resume_ckpt.get("train_config"), self.cfg.to_dict())
        for name, (old, new) in changes.items():
            note(f"--resume: {name} {old} -> {new} from epoch {self.start_epoch + 1} on")
        self.resumes = [*resume_ckpt.get("resumes", []), resume_entry(self.start_epoch, str(self.resume_path), changes)]
        return resume_ckpt

    def _restore(self, ckpt: dict) -> None:
        """The prompts, the optimizer's state and the loss history of the checkpoint resumed from.
        The restored optimizer state carries the learning rate it was saved with: this run's rate
        (the checkpoint's unless --learning_rate gave another) holds from the next step on."""
        self.model.load_prompts(ckpt)
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.learning_rate
        self.history = [h for h in ckpt.get("history", []) if h.get("epoch", 0) <= self.start_epoch]

    def _data_identity(self) -> dict:
        return {"images": len(self.dataset), "classes": list(self.dataset.classes)}

    def _check_same_data(self, ckpt: Optional[dict]) -> None:
        """A resumed run trains on the images of its checkpoint: each epoch's batch order names
        images by their position in the data (docs/design.md §5.1)."""
        recorded = ckpt.get("data") if ckpt is not None else None
        if recorded and recorded != self._data_identity():
            now = self._data_identity()
            raise ValueError(f"--resume: {self.cfg.train_data_path} holds other training data than the checkpoint's "
                             f"({now['images']} images of classes {now['classes']}, the checkpoint "
                             f"{recorded['images']} of {recorded['classes']}); the run can only continue on the same "
                             f"images: give the checkpoint's --train_data_path, or start a new run")

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
        """``epoch_N.pth`` (self-contained: the model's config and backbone, the settings as they hold
        now, every resume with what it changed, the data's identity, the losses so far) and the history."""
        path = self.save_dir / f"epoch_{epoch}.pth"
        if self.ctx.is_main:
            ckpt = self.model.checkpoint(epoch, self.optimizer.state_dict(), train_config=self.cfg.to_dict(),
                                         losses=mean, resumes=self.resumes, data=self._data_identity(),
                                         history=self.history)
            write_torch(path, ckpt)
            self._write_history()
        self.ctx.barrier()
        return path

    def _write_history(self) -> None:
        """``train_history.json``: the losses of every epoch so far (a resumed run's earlier ones too)."""
        write_json(self.save_dir / "train_history.json", {
            "model_config": self.model.cfg.to_dict(), "train_config": self.cfg.to_dict(), "resumes": self.resumes,
            "epochs": self.history})

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
                mean = self._epoch(epoch)
                self.history.append(mean)
                if (epoch + 1) % max(cfg.print_freq, 1) == 0:
                    self.log(f"epoch [{epoch + 1}/{cfg.epoch}] loss {mean['total']:.4f} "
                             f"(local {mean['local']:.4f}, global {mean['global']:.4f}, "
                             f"contrastive {mean['contrastive']:.4f}) {mean['seconds']:.1f}s")
                if (epoch + 1) % max(cfg.save_freq, 1) == 0 or epoch + 1 == cfg.epoch:
                    last = self._save(epoch + 1, mean)
        except KeyboardInterrupt:
            done = (epoch_files(self.save_dir) or [None])[-1]
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
        return Trainer(model_cfg, cfg, ctx, clip=clip, resume_point=resume_point, trust=trust).run()
    finally:
        ctx.shutdown()
