"""Machine-dependent defaults: loader workers and test batch size when the user gives none.

Why they depend on the machine: on a GPU the frozen ViT-L scores ~200 images/s at 518 px in bf16,
while decoding and bicubic-resizing one real dataset image (a 1500x1000 VisA JPEG, say) takes
10-40 ms of one CPU core, so a fixed two workers would starve the GPU. On a CPU the model itself
is the bottleneck (about one image per second) and extra workers only take cores from it.
"""
from __future__ import annotations

import os
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


def resolve_num_workers(requested: Optional[int], device: torch.device | str) -> int:
    """``requested`` if given (must be >= 0), else :func:`default_num_workers`."""
    if requested is None:
        return default_num_workers(device)
    if int(requested) < 0:
        raise ValueError(f"--num_workers must be >= 0 (0 loads in the main process), got {requested}")
    return int(requested)


def resolve_batch_size(requested: Optional[int], device: torch.device | str) -> int:
    """``requested`` if given (must be >= 1), else :func:`default_test_batch_size`."""
    if requested is None:
        return default_test_batch_size(device)
    if int(requested) < 1:
        raise ValueError(f"--batch_size must be >= 1, got {requested}")
    return int(requested)
