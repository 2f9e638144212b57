"""Machine-dependent defaults: loader workers and test batch size when the user gives none.

Why they depend on the machine: on a GPU the frozen ViT-L scores ~200 images/s at 518 px in bf16,
while decoding and bicubic-resizing one real dataset image (a 1500x1000 VisA JPEG, say) takes
10-40 ms of one CPU core, so a fixed two workers would starve the GPU. On a CPU the model itself
is the bottleneck (about one image per second) and extra workers only take cores from it.

Worker processes hand batches over through shared memory (/dev/shm on Linux). Docker gives a
container 64 MiB of it by default, less than 12 workers reading ahead hold, and running out kills a
worker with a bus error mid-run; :func:`fit_to_shared_memory` scales the read-ahead down first.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

GPU_TEST_BATCH = 16
CPU_TEST_BATCH = 8
MAX_WORKERS = 12


def available_cpus() -> int:
    """CPU cores this process may run on (respects taskset/cgroup affinity where the OS reports it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def processes_per_node() -> int:
    """Processes sharing this machine's cores: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_num_workers(device: torch.device | str, cpus: Optional[int] = None,
                        processes: Optional[int] = None) -> int:
    """Loader worker processes for one process on ``device``.

    GPU: this process's share of the cores minus two (its own main thread, which launches the GPU
    work, and the pin-memory thread), at least 1 and at most ``MAX_WORKERS``. CPU: one worker
    when the share has a core to spare, else none (loading then runs in the main process)."""
    device = torch.device(device)
    cpus = available_cpus() if cpus is None else int(cpus)
    processes = processes_per_node() if processes is None else int(processes)
    share = max(1, cpus // max(1, processes))
    if device.type == "cuda":
        return max(1, min(MAX_WORKERS, share - 2))
    return 1 if share >= 2 else 0


def default_test_batch_size(device: torch.device | str) -> int:
    """Images per test batch: large enough to keep a GPU busy, modest on a CPU (metrics do not depend
    on it)."""
    return GPU_TEST_BATCH if torch.device(device).type == "cuda" else CPU_TEST_BATCH


def _given_or_default(requested: Optional[int], default: int, minimum: int, flag: str, meaning: str = "") -> int:
    """``requested`` if given (it must be >= ``minimum``), else ``default``: the library entry points
    (``evaluate``, ``Trainer``) take these counts from callers that bypass the settings dataclasses."""
    if requested is None:
        return default
    if int(requested) < minimum:
        raise ValueError(f"{flag} must be >= {minimum}{meaning}, got {requested}")
    return int(requested)


def resolve_num_workers(requested: Optional[int], device: torch.device | str) -> int:
    """``requested`` if given (must be >= 0), else :func:`default_num_workers`."""
    return _given_or_default(requested, default_num_workers(device), 0, "--num_workers",
                             " (0 loads in the main process)")


def resolve_batch_size(requested: Optional[int], device: torch.device | str) -> int:
    """``requested`` if given (must be >= 1), else :func:`default_test_batch_size`."""
    return _given_or_default(requested, default_test_batch_size(device), 1, "--batch_size")


def shared_memory_bytes(path: str = "/dev/shm") -> Optional[int]:
    """Free bytes of the filesystem loader workers hand batches over through; None where unknown."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


@dataclass(frozen=True)
class LoaderPlan:
    """How many workers read how many batches ahead, and why that is less than asked (or None)."""

    num_workers: int
    prefetch_factor: Optional[int]  # None when loading runs in the main process
    note: Optional[str] = None

    def loader_kwargs(self) -> dict:
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        return {"num_workers": self.num_workers, **extra}


def fit_to_shared_memory(num_workers: int, prefetch_factor: int, batch_bytes: int,
                         free_bytes: Optional[int] = None, processes: int = 1) -> LoaderPlan:
    """Workers and read-ahead whose batches in flight (workers x prefetch x batch) take at most half of
    this process's share of the free shared memory (``processes`` on the machine share it): fewer
    batches ahead first, then fewer workers, then loading in the main process. ``free_bytes`` None:
    measured (unknown: nothing is changed)."""
    if num_workers <= 0:
        return LoaderPlan(0, None)
    free = shared_memory_bytes() if free_bytes is None else int(free_bytes)
    need = num_workers * prefetch_factor * batch_bytes
    budget = None if free is None else free // (2 * max(1, int(processes)))
    if budget is None or batch_bytes <= 0 or need <= budget:
        return LoaderPlan(num_workers, prefetch_factor)
    workers, prefetch = num_workers, min(prefetch_factor, budget // (num_workers * batch_bytes))
    if prefetch < 1:
        workers, prefetch = min(num_workers, budget // batch_bytes), 1
    if workers < 1:
        workers, prefetch = 0, None
    using = (f"{workers} worker{'s' if workers > 1 else ''} x {prefetch} batch{'es' if prefetch > 1 else ''} ahead"
             if workers else
             "loading in the main process")
    shared = f" for {processes} processes" if processes > 1 else ""
    note = (f"shared memory (/dev/shm) has {free / 2**20:.0f} MiB free{shared}, too little for {num_workers} loader "
            f"workers x {prefetch_factor} batches ahead of {batch_bytes / 2**20:.1f} MiB each: {using}, which may "
            "load slower. In Docker, raise it with --shm-size (e.g. 4g)")
    return LoaderPlan(workers, prefetch, note)


def uint8_batch_bytes(batch_size: int, image_size: int) -> int:
    """Bytes of one loader batch of uint8 images [B,3,S,S] and uint8 masks [B,S,S]."""
    return int(batch_size) * 4 * int(image_size) ** 2


def plan_loader(dataset, batches: list[list[int]], num_workers: int, prefetch_factor: int) -> LoaderPlan:
    """:func:`fit_to_shared_memory` for a loader of ``dataset`` (uint8 items of its ``image_size``)
    over ``batches``; says on stderr what it scaled down."""
    largest = max((len(b) for b in batches), default=0)
    plan = fit_to_shared_memory(num_workers, prefetch_factor, uint8_batch_bytes(largest, dataset.image_size),
                                processes=processes_per_node())
    if plan.note:
        print(f"glocalclip: {plan.note}", file=sys.stderr)
    return plan
