"""A store of encoded training images, so later epochs skip the frozen image encoder.

CLIP is frozen and training has no augmentation: an image's global feature and patch tokens
are the same every epoch, so caching them is exact (docs/design.md §11). Only the distinct patch
tensors of the encoder's layer data are kept, with their counts — with ``multilayer="reference"``
the last three selected layers are one tensor counted three times — plus the masks (as uint8)
and labels. The store lives on the GPU when it fits, else in host memory,
else in a disk memmap (``location="auto"``).
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..files import make_temp_dir, translated
from ..model.layers import LayerFeatures
from .distributed import DistContext
from .settings import FEATURE_CACHE_PLACES as LOCATIONS  # declared once, with the setting


def _free_host_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def choose_location(requested: str, nbytes: int, device: torch.device) -> str:
    """Resolve ``auto``: the device if the store takes under half its free memory, else host RAM
    under half the free memory, else disk."""
    if requested not in LOCATIONS:
        raise ValueError(f"--feature_cache must be one of {LOCATIONS}, got {requested!r}")
    if requested != "auto":
        if requested == "device" and device.type == "cpu":
            return "host"
        return requested
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < 0.5 * free:
            return "device"
    if nbytes < 0.5 * _free_host_bytes():
        return "host"
    return "disk"


def _disk_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 .npy memmap whose blocks are reserved now: a disk too small for it fails here with
    an OutputError, not later with a SIGBUS when a page of the map is first written."""
    with translated(path):
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        reserve = getattr(os, "posix_fallocate", None)  # Linux; elsewhere the file stays sparse
        fd = os.open(path, os.O_RDWR)
        try:
            if reserve is not None:
                reserve(fd, 0, os.fstat(fd).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system that cannot reserve: go on
                raise
        finally:
            os.close(fd)
    return array


class FeatureCache:
    """Features of ``n`` images, filled batch by batch, read back by dataset index.

    One patch store per distinct layer tensor; ``layer_counts[s]`` is how many selected layers
    store ``s`` stands for (the encoder's :class:`LayerFeatures` counts), given back by :meth:`get`.
    """

    def __init__(self, n: int, global_dim: int, tokens: int, width: int, layer_counts: tuple[int, ...],
                 mask_size: int, location: str, device: torch.device, disk_dir: Optional[str] = None):
        self.n = n
        self.layer_counts = tuple(layer_counts)
        self.location = location
        self.device = device
        n_slots = len(self.layer_counts)
        store = device if location == "device" else torch.device("cpu")
        self._remove_dir: Optional[weakref.finalize] = None
        if location == "disk":
            # named after this process, so that the next start in the folder removes it if this
            # process is killed (glocalclip.files.remove_leftovers); removed on close or exit
            folder = make_temp_dir(disk_dir if disk_dir is not None else tempfile.gettempdir(), "cache")
            self._remove_dir = weakref.finalize(self, shutil.rmtree, folder, True)
            self.patches = [torch.from_numpy(_disk_array(folder / f"patches_{s}.npy", (n, tokens, width)))
                            for s in range(n_slots)]
        else:
            self.patches = [torch.empty(n, tokens, width, dtype=torch.float32, device=store)
                            for _ in range(n_slots)]
        self.global_features = torch.empty(n, global_dim, dtype=torch.float32, device=store)
        self.masks = torch.empty(n, mask_size, mask_size, dtype=torch.uint8, device=store)
        self.labels = torch.empty(n, dtype=torch.long, device=store)
        self.mask_valid = torch.empty(n, dtype=torch.bool, device=store)

    @classmethod
    def sized_for(cls, n: int, global_features: torch.Tensor, layers: LayerFeatures, mask_size: int,
                  requested: str, device: torch.device, disk_dir: Optional[str] = None,
                  log=lambda msg: None) -> "FeatureCache":
        """A store for ``n`` images shaped like a first encoded batch (``global_features`` [B, E], the
        layers' patch tokens [B, N, W]), placed where ``requested`` (``--feature_cache``) resolves to."""
        tokens, width = layers.tensors[0].shape[1:]
        dim = global_features.shape[1]
        nbytes = cls.nbytes(n, dim, tokens, width, len(layers.tensors), mask_size)
        where = choose_location(requested, nbytes, device)
        log(f"feature cache: {nbytes / 2**30:.2f} GiB in {where} memory")
        return cls(n, dim, tokens, width, layers.counts, mask_size, where, device, disk_dir=disk_dir)

    @staticmethod
    def nbytes(n: int, global_dim: int, tokens: int, width: int, n_slots: int, mask_size: int) -> int:
        return n * (4 * (global_dim + n_slots * tokens * width) + mask_size * mask_size + 9)

    def put(self, indices: torch.Tensor, global_features: torch.Tensor, layers: LayerFeatures,
            masks: torch.Tensor, labels: torch.Tensor, mask_valid: torch.Tensor) -> None:
        if layers.counts != self.layer_counts:
            raise ValueError(f"layer counts {layers.counts} differ from the cache's {self.layer_counts}")
        idx = indices.cpu()
        store_idx = idx.to(self.global_features.device)
        self.global_features[store_idx] = global_features.detach().to(self.global_features.device)
        for slot, p in enumerate(layers.tensors):
            dst = self.patches[slot]
            if self.location == "disk":
                dst[idx] = p.detach().cpu()
            else:
                dst[store_idx] = p.detach().to(dst.device)
        self.masks[store_idx] = (masks > 0.5).to(torch.uint8).to(self.masks.device)
        self.labels[store_idx] = labels.long().to(self.labels.device)
        self.mask_valid[store_idx] = mask_valid.bool().to(self.mask_valid.device)

    def fields(self) -> list[torch.Tensor]:
        """Every stored array, in a fixed order (for copying whole rows between processes)."""
        return [self.global_features, *self.patches, self.masks, self.labels, self.mask_valid]

    def read_rows(self, indices: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        idx = indices.cpu()
        return [f[idx if f.device.type == "cpu" else idx.to(f.device)].to(device) for f in self.fields()]

    def write_rows(self, indices: torch.Tensor, rows: list[torch.Tensor]) -> None:
        idx = indices.cpu()
        for f, r in zip(self.fields(), rows):
            f[idx if f.device.type == "cpu" else idx.to(f.device)] = r.to(f.device)

    def row_shapes(self, n_rows: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((n_rows, *f.shape[1:]), f.dtype) for f in self.fields()]

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, LayerFeatures, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
        """(global features, patch features as layer data, masks float, labels, mask_valid), all
        on the training device."""
        idx = indices.cpu()
        dev = self.device
        store_idx = idx.to(self.global_features.device)
        slots = [p[idx if self.location == "disk" else store_idx].to(dev, non_blocking=True)
                 for p in self.patches]
        return (self.global_features[store_idx].to(dev), LayerFeatures(tuple(slots), self.layer_counts),
                self.masks[store_idx].to(dev).float(), self.labels[store_idx].to(dev),
                self.mask_valid[store_idx].to(dev))

    def close(self) -> None:
        if self._remove_dir is not None:
            self.patches = []
            self._remove_dir()
            self._remove_dir = None


def share_chunks(cache: Optional[FeatureCache], chunks: list[list[int]], ctx: DistContext) -> FeatureCache:
    """Under torchrun each process encoded every K-th chunk of the images (chunk j by rank j % K):
    broadcast each chunk from the process that encoded it to every other, so every process ends
    with the whole cache."""
    if cache is None:  # a process with no chunk of its own (more processes than chunks)
        raise RuntimeError("more torchrun processes than training batches; use fewer processes")
    comm = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
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
