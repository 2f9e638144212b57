"""Few-shot scoring: K normal reference images sharpen the zero-shot map (docs/design.md §11).

The reference bank holds the K images' patch features of the chosen layers (class row dropped,
L2-normalised). Each test patch's distance to the bank is min over the bank of (1 − cos)/2; per layer
the distances are upsampled to the image as the zero-shot maps are, averaged over layers, weighted
and added to the zero-shot map. The image score gains the map's max (or mean).

Everything here is a pure function of tensors except :class:`ReferenceBank`'s file I/O; the search is
a matmul on the features' device, in blocks of at most ``MAX_BLOCK_ELEMENTS`` similarities.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..files import refuse_existing, write_torch
from .config import BANK_SUFFIXES, FEW_SHOT_IMAGE_TERMS, FewShotSettings, is_bank_name
from .layers import LayerFeatures


#: the largest block of test-patch × bank similarities held at once (float32: 256 MiB). At 518 px on
#: ViT-L-14 (37×37 = 1369 patches, E = 768) K = 16 shots make a bank of 21 904 rows per layer (67 MB);
#: a batch of 16 test images is 21 904 query rows, so the full similarity matrix would be 1.9 GB per
#: layer. Blocks of 2**26 keep the search's transient memory at 256 MiB plus the [Q] running minimum,
#: on a 24 GB CPU or beside the ViT-L activations on one 80 GB GPU (docs/design.md §11).
MAX_BLOCK_ELEMENTS = 2 ** 26

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------- the pure functions
def normalised_patches(tokens: torch.Tensor) -> torch.Tensor:
    """Patch rows of [B, 1+N, E] (class row dropped), L2-normalised, float32 -> [B, N, E]."""
    p = tokens[:, 1:].float()
    return p / p.norm(dim=-1, keepdim=True)


def bank_from_features(patch_feats: Union[LayerFeatures, Sequence[torch.Tensor]]) -> LayerFeatures:
    """The bank of the shots' patch features: per distinct layer tensor [K, 1+N, E] the K·N patch
    rows normalised -> [K·N, E]; each keeps its layer count."""
    return LayerFeatures.of(patch_feats).map(lambda t: normalised_patches(t).reshape(-1, t.shape[-1]))


def nearest_distances(patches: torch.Tensor, bank: torch.Tensor,
                      max_block: int = MAX_BLOCK_ELEMENTS) -> torch.Tensor:
    """min over the bank of (1 − cos)/2 for every patch: ``patches`` [B, N, E] and ``bank`` [M, E],
    both normalised -> [B, N]. Blocks of at most ``max_block`` similarities (query rows × bank rows)."""
    b, n, e = patches.shape
    q = patches.reshape(b * n, e)
    m = bank.shape[0]
    if m == 0:
        raise ValueError("the reference bank is empty")
    if not isinstance(q.shape[0], int):
        # a symbolic batch (torch.export with a dynamic batch): no loop over queries can be traced, so
        # all queries meet one bank slice at a time, slices of the rows a batch of 16 would take
        m_rows = max(1, min(m, max_block // (16 * n)))
        top = None
        for ms in range(0, m, m_rows):
            sims = (q @ bank[ms:ms + m_rows].t()).amax(dim=1)
            top = sims if top is None else torch.maximum(top, sims)
        return ((1 - top) / 2).clamp_min(0).reshape(b, n)
    q_rows = max(1, min(q.shape[0], max_block // min(m, max_block)))
    m_rows = max(1, min(m, max_block // q_rows))
    best = []
    for qs in range(0, q.shape[0], q_rows):
        qc = q[qs:qs + q_rows]
        top = None
        for ms in range(0, m, m_rows):
            sims = (qc @ bank[ms:ms + m_rows].t()).amax(dim=1)  # [q_rows]
            top = sims if top is None else torch.maximum(top, sims)
        best.append(top)
    cos = torch.cat(best) if len(best) > 1 else best[0]
    return ((1 - cos) / 2).clamp_min(0).reshape(b, n)


def few_shot_map(patch_feats: Union[LayerFeatures, Sequence[torch.Tensor]], bank: LayerFeatures,
                 image_size: int, max_block: int = MAX_BLOCK_ELEMENTS) -> torch.Tensor:
    """The few-shot map [B, H, W]: per layer the patches' distances to that layer's bank, upsampled
    bilinearly as the zero-shot maps are (model/scoring.py), averaged over the selected layers (a
    tensor standing for k layers counts k times). Unweighted: :func:`join_scores` weights it."""
    feats = LayerFeatures.of(patch_feats)
    if feats.counts != bank.counts or len(feats.tensors) != len(bank.tensors):
        raise ValueError(f"the reference bank holds layers counted {bank.counts}, the features {feats.counts}: "
                         "the bank was built with another model or another layer choice")
    total = None
    for (tokens, k), layer_bank in zip(feats.weighted(), bank.tensors):
        patches = normalised_patches(tokens)  # [B, N, E]
        dist = nearest_distances(patches, layer_bank.to(patches.device), max_block)  # [B, N]
        side = int(math.isqrt(dist.shape[1]))
        if side * side != dist.shape[1]:
            raise ValueError(f"{dist.shape[1]} patch tokens do not form a square grid")
        grid = dist.reshape(-1, 1, side, side)
        up = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
        total = k * up if total is None else total + k * up
    return total / len(feats)


def image_term(fs_map: torch.Tensor, how: str) -> torch.Tensor:
    """What the image score gains from a (weighted) few-shot map [B, H, W] -> [B]."""
    flat = fs_map.flatten(1)
    if how == "max":
        return flat.max(dim=1).values
    if how == "mean":
        return flat.mean(dim=1)
    raise ValueError(f"unknown few-shot image term {how!r}; one of {FEW_SHOT_IMAGE_TERMS}")


def join_scores(out: dict[str, torch.Tensor], fs_map: torch.Tensor, settings: FewShotSettings
                ) -> dict[str, torch.Tensor]:
    """The zero-shot output with the few-shot term added: map += weight·map_fs, image score (and the
    global score the test protocol fuses with the smoothed map) += its max or mean."""
    weighted = settings.weight * fs_map
    gain = image_term(weighted, settings.image_term)
    joined = {**out, "anomaly_map": out["anomaly_map"] + weighted, "image_score": out["image_score"] + gain,
              "few_shot_map": weighted}
    if "global_score" in out:
        joined["global_score"] = out["global_score"] + gain
    return joined


# ---------------------------------------------------------------------------- the bank as an object
BANK_FORMAT = "glocalclip-reference-bank/1"


def check_bank_target(path: PathLike, overwrite: bool = False) -> None:
    """What :meth:`ReferenceBank.save` refuses, checked before a bank is built (a ViT-L bank takes
    minutes): a name ``--reference`` would not read back as a bank, or an existing file unless
    ``overwrite`` (OutputError)."""
    if not is_bank_name(path):
        raise ValueError(f"cannot save a reference bank as {path}: its name must end in "
                         f"{', '.join(BANK_SUFFIXES)}, which --reference reads as a bank")
    if not overwrite:
        refuse_existing(path)


@dataclass(frozen=True, eq=False)
class ReferenceBank:
    """A bank ready to score with: its layers ([M, E] each, with counts), how it joins the zero-shot
    scores, and what it was built from (so a bank cannot be used with a model it does not fit)."""

    layers: LayerFeatures
    settings: FewShotSettings
    image_size: int
    model_key: dict[str, Any]  # the model settings that change the features (see ``features_key``)
    sources: tuple[str, ...] = ()

    @property
    def n_rows(self) -> int:
        return int(self.layers.tensors[0].shape[0])

    def to(self, device: Union[str, torch.device]) -> "ReferenceBank":
        return dataclasses.replace(self, layers=self.layers.map(lambda t: t.to(device)))

    def check_fits(self, model_cfg: Any) -> None:
        """Refuse a model whose features differ from those the bank was built with."""
        want = features_key(model_cfg, self.settings)
        diff = {k: (self.model_key.get(k), v) for k, v in want.items() if self.model_key.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: bank {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"the reference bank was built with another model ({detail}); build it again "
                             "with --reference on this checkpoint")

    def save(self, path: PathLike, overwrite: bool = False) -> None:
        """A plain torch file of tensors, numbers and strings (read back with ``weights_only=True``),
        written atomically. Its name must end in a suffix ``--reference`` reads as a bank; an existing
        file is kept (OutputError) unless ``overwrite``."""
        check_bank_target(path, overwrite)
        write_torch(path, {"format": BANK_FORMAT, "tensors": [t.cpu().contiguous() for t in self.layers.tensors],
                           "counts": list(self.layers.counts), "settings": self.settings.to_dict(),
                           "image_size": int(self.image_size), "model_key": dict(self.model_key),
                           "sources": list(self.sources)}, replace=overwrite)

    @classmethod
    def load(cls, path: PathLike, map_location: Union[str, torch.device] = "cpu") -> "ReferenceBank":
        try:
            d = torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - a file that is not a bank: one message naming the fix
            raise ValueError(f"{path} is not a reference bank saved by glocalclip ({type(e).__name__}: {e}); "
                             "build it again with --reference DIR --save_reference FILE") from None
        if not isinstance(d, dict) or d.get("format") != BANK_FORMAT:
            raise ValueError(f"{path} is not a reference bank saved by glocalclip (format "
                             f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}, expected {BANK_FORMAT})")
        return cls(LayerFeatures(tuple(d["tensors"]), tuple(d["counts"])), FewShotSettings.from_dict(d["settings"]),
                   int(d["image_size"]), dict(d["model_key"]), tuple(d["sources"]))


class BankBuffers(nn.Module):
    """A bank held as module buffers: it moves with the detector's ``.to()``, and an exported graph
    takes it in as constants (docs/design.md §10, §11). :meth:`bank` is the bank to score with."""

    def __init__(self, bank: ReferenceBank):
        super().__init__()
        for i, t in enumerate(bank.layers.tensors):
            self.register_buffer(f"layer{i}", t.detach().clone())  # [M, E]
        self.counts = bank.layers.counts
        self.about = dataclasses.replace(bank, layers=LayerFeatures((), ()))  # settings, sources, model key

    @property
    def settings(self) -> FewShotSettings:
        return self.about.settings

    def bank(self) -> ReferenceBank:
        tensors = tuple(getattr(self, f"layer{i}") for i in range(len(self.counts)))
        return dataclasses.replace(self.about, layers=LayerFeatures(tensors, self.counts))

    def describe(self) -> dict[str, Any]:
        """What a deployed file records about its bank: the settings and the reference images' names."""
        return {"settings": self.settings.to_dict(), "images": len(self.about.sources),
                "sources": [os.path.basename(s) for s in self.about.sources], "rows": int(self.layer0.shape[0])}


def features_key(model_cfg: Any, settings: FewShotSettings) -> dict[str, Any]:
    """The model settings the bank's features depend on."""
    return {"backbone": model_cfg.backbone, "pretrained": model_cfg.pretrained, "image_size": model_cfg.image_size,
            "features_list": list(model_cfg.features_list), "dpam_layer": model_cfg.dpam_layer,
            "multilayer": model_cfg.multilayer if settings.layers == "selected" else "blocks"}
