"""The processes of one ``predict`` run: one by default; under ``torchrun`` (``python -m
torch.distributed.run --nproc_per_node K -m glocalclip predict ...``) K, each scoring its share of
the batches into the one output folder. Torch-free: torchrun's process group (``torchrun.py``) is
imported only when the run has one, as a table imports a backend."""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Sequence, TypeVar

T = TypeVar("T")


class Processes:
    """A run of one process: it has every batch, and every exchange is with itself."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: Optional[str]) -> Optional[str]:
        return requested

    def steps(self, n_batches: int) -> int:
        """Rounds of one batch per process: every process takes part in each round's exchange."""
        return -(-n_batches // self.world_size)

    def batch_of(self, batches: Sequence[T], step: int) -> Optional[T]:
        """This process's batch of round ``step``: batch ``step * K + rank``, so that the rows, put
        back in rank order each round, come in the order one process writes them."""
        i = step * self.world_size + self.rank
        return batches[i] if i < len(batches) else None

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        return obj

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` on the main process, in rank order ([] elsewhere)."""
        return [obj]

    def close(self) -> None:
        pass


def processes_of_this_run() -> Processes:
    """torchrun's processes when it started this one (WORLD_SIZE > 1), else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return importlib.import_module("glocalclip.apps.torchrun").TorchrunProcesses()
    return Processes()
