"""Per-layer features as data: the distinct tensors and how many selected layers each stands for.

With ``multilayer="reference"`` every selected layer from the last standard block on is one and
the same V-V tensor (docs/design.md §2.4), so the local branch computes it once and counts it
several times. The count is carried here, beside the tensor, so that nothing downstream has to
recognise shared tensors, and a ``.float()`` or ``.to()`` on the way cannot change the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch


@dataclass(frozen=True, eq=False)
class LayerFeatures:
    """``tensors[i]`` is selected ``counts[i]`` times in a row, in ``features_list`` order.

    Read as a sequence it is the per-layer list (``len`` = number of selected layers), so it goes
    wherever that list went; the distinct view is ``tensors``/``counts``.
    """

    tensors: tuple[torch.Tensor, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        object.__setattr__(self, "counts", tuple(int(k) for k in self.counts))
        if len(self.tensors) != len(self.counts):
            raise ValueError(f"{len(self.tensors)} tensors but {len(self.counts)} counts")
        if any(k < 1 for k in self.counts):
            raise ValueError(f"every layer tensor is counted at least once, got counts {self.counts}")

    @classmethod
    def of(cls, layers: Union["LayerFeatures", Sequence[torch.Tensor]]) -> "LayerFeatures":
        """Layer data as it is, or a plain per-layer list with every entry its own layer."""
        if isinstance(layers, LayerFeatures):
            return layers
        return cls(tuple(layers), (1,) * len(layers))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LayerFeatures":
        """``fn`` applied once per distinct tensor; the counts stay."""
        return LayerFeatures(tuple(fn(t) for t in self.tensors), self.counts)

    def weighted(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(distinct tensor, count) pairs in layer order."""
        return zip(self.tensors, self.counts)

    def per_layer(self) -> list[torch.Tensor]:
        """One entry per selected layer (a shared tensor repeated)."""
        return [t for t, k in self.weighted() for _ in range(k)]

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.per_layer())

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.per_layer()[index]
