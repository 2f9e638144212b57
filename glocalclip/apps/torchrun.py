"""``predict`` under torchrun: :class:`Processes` over PyTorch's process group (gloo on CPUs, NCCL
on GPUs), each process on its own device."""
from __future__ import annotations

from typing import Any, Optional

import torch.distributed as dist

from ..engine.distributed import init_distributed, resolve_device
from .processes import Processes


class TorchrunProcesses(Processes):
    def __init__(self) -> None:
        self._ctx = init_distributed("cpu")  # the group; each process's device is chosen by device()
        self.rank, self.world_size = self._ctx.rank, self._ctx.world_size

    def device(self, requested: Optional[str]) -> Optional[str]:
        """This process's device: its local GPU where there is one (or the one asked for), else the CPU."""
        if requested is None or requested.startswith("cuda") and ":" not in requested:
            return str(resolve_device(requested, self._ctx.local_rank))
        return requested

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        return self._ctx.gather_objects(obj) or []

    def close(self) -> None:
        self._ctx.shutdown()
