"""The original code's random draws, replayed (docs/design.md §5.1): what ``--seed`` means.

The original ``train.py`` seeds PyTorch's default CPU generator, then builds CLIP, the prompt
learner and the V-V attention modules, each drawing its default initialisation, and every epoch
its ``DataLoader(shuffle=True)`` draws two more numbers. A draw depends only on the kind of
operation and the tensor's size, never on the device or on weights loaded later, so building
throwaway modules of the backbone's sizes in the same order reproduces the original's initial
prompts and batch order bit for bit: no original code, no pretrained weights, one block in
memory at a time.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..model.checkpoint_format import GLOCAL_KEYS
from ..model.prompts import PROMPT_INIT_STD

#: the output width of the original's unused per-depth projection, Linear(text width, 896)
UNUSED_PROJECTION_WIDTH = 896
#: the original's prompt-learner parameters, in the order it draws them


@dataclass(frozen=True)
class BackboneSizes:
    """The sizes the original read off CLIP's weights before building it (its ``build_model``)."""

    vision_width: int
    vision_layers: int
    patch_size: int
    grid: int  # the weights' own patch grid: positional table rows = grid² + 1
    embed_dim: int
    text_width: int
    text_layers: int
    vocab_size: int
    context_length: int

    @classmethod
    def of_clip(cls, clip: nn.Module) -> "BackboneSizes":
        """Sizes of a built open_clip CLIP (ViT image tower, CLIP text tower)."""
        visual = clip.visual
        positions = int(visual.positional_embedding.shape[0])
        grid = math.isqrt(positions - 1)
        if grid * grid + 1 != positions:
            raise ValueError(f"the vision positional table has {positions} rows, not grid² + 1")
        projection = clip.text_projection
        embed_dim = projection.shape[1] if isinstance(projection, torch.Tensor) else visual.proj.shape[1]
        return cls(vision_width=int(visual.conv1.weight.shape[0]),
                   vision_layers=len(visual.transformer.resblocks),
                   patch_size=int(visual.conv1.weight.shape[-1]), grid=grid, embed_dim=int(embed_dim),
                   text_width=int(clip.token_embedding.weight.shape[1]),
                   text_layers=len(clip.transformer.resblocks),
                   vocab_size=int(clip.token_embedding.weight.shape[0]),
                   context_length=int(clip.positional_embedding.shape[0]))


@dataclass(frozen=True)
class PromptSizes:
    """The original's prompt and surgery settings (``--n_ctx --ab_ctx --depth --t_n_ctx --dpam``)."""

    n_ctx: int
    ab_ctx: int
    depth: int
    t_n_ctx: int
    dpam_layer: int

    @classmethod
    def of_config(cls, cfg: Any) -> "PromptSizes":
        """From a ``GlocalCLIPConfig`` (or anything with its field names)."""
        return cls(n_ctx=cfg.n_ctx, ab_ctx=cfg.ab_ctx, depth=cfg.depth, t_n_ctx=cfg.t_n_ctx,
                   dpam_layer=cfg.dpam_layer)


@contextlib.contextmanager
def _plain_cpu_defaults() -> Iterator[None]:
    """fp32 on the CPU while replaying, as the original built its modules, whatever defaults the
    caller set (another dtype or default device would draw other numbers, or on another generator)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def _heads(width: int) -> int:
    """The original's head count (width // 64); heads change no parameter shape, hence no draw."""
    heads = width // 64
    return heads if heads >= 1 and width % heads == 0 else 1


def _draw_residual_block(width: int) -> None:
    """A transformer block's default initialisation, module by module in the original's order."""
    nn.MultiheadAttention(width, _heads(width))
    nn.LayerNorm(width)
    nn.Linear(width, 4 * width)
    nn.Linear(4 * width, width)
    nn.LayerNorm(width)


def _text_init_shapes(b: BackboneSizes) -> Iterator[tuple[int, int]]:
    """The tensors CLIP's ``initialize_parameters`` redraws with normal_ (stds draw alike)."""
    w = b.text_width
    yield b.vocab_size, w  # token embedding
    yield b.context_length, w  # text positional embedding
    for _ in range(b.text_layers):
        yield from ((3 * w, w), (w, w), (4 * w, w), (w, 4 * w))  # in_proj, out_proj, c_fc, c_proj
    yield w, b.embed_dim  # text projection


def _replay_clip_build(b: BackboneSizes) -> None:
    """§5.1 step 1: building CLIP before its weights are loaded."""
    w = b.vision_width
    nn.Conv2d(3, w, b.patch_size, stride=b.patch_size, bias=False)
    torch.randn(w)  # class embedding
    torch.randn(b.grid * b.grid + 1, w)  # positional embedding
    nn.LayerNorm(w)
    for _ in range(b.vision_layers):
        _draw_residual_block(w)
    nn.LayerNorm(w)
    torch.randn(w, b.embed_dim)  # projection
    for _ in range(b.text_layers):
        _draw_residual_block(b.text_width)
    nn.Embedding(b.vocab_size, b.text_width)
    for shape in _text_init_shapes(b):
        torch.empty(shape).normal_()


def _replay_prompt_learner(b: BackboneSizes, p: PromptSizes) -> dict[str, torch.Tensor]:
    """§5.1 step 2: the prompt learner's parameters, keyed as ``GlocalPromptLearner.state_dict()``."""
    rows = {"ctx_global_pos": p.n_ctx, "ctx_global_neg": p.ab_ctx,
            "ctx_local_pos": p.n_ctx, "ctx_local_neg": p.ab_ctx}
    state = {name: torch.empty(rows[name], b.text_width).normal_(std=PROMPT_INIT_STD) for name in GLOCAL_KEYS}
    for i in range(p.depth - 1):
        state[f"compound_prompts_text.{i}"] = torch.empty(p.t_n_ctx, b.text_width).normal_(std=PROMPT_INIT_STD)
    nn.Linear(b.text_width, UNUSED_PROJECTION_WIDTH)  # its depth-1 copies are deep copies: no draws
    return state


def _replay_vv_surgery(b: BackboneSizes, p: PromptSizes) -> None:
    """§5.1 step 3: one fresh V-V attention (qkv, out projection) per modified block."""
    for _ in range(p.dpam_layer - 1):
        nn.Linear(b.vision_width, 3 * b.vision_width)
        nn.Linear(b.vision_width, b.vision_width)


def _draw_int64(generator: torch.Generator) -> int:
    """One draw as the DataLoader makes it (iterator base seed, sampler seed)."""
    return int(torch.empty((), dtype=torch.int64, device="cpu").random_(generator=generator))


class OriginalDraws:
    """The original run's draws for one seed and set of sizes: its initial prompts and, for every
    epoch, its batch order. Replays steps 1-3 once (seconds at ViT-L size) and keeps the generator
    state after them, so each epoch's order costs two draws per epoch before it and one randperm.
    The caller's random state (CPU and every device) is left as it was."""

    def __init__(self, seed: int, backbone: BackboneSizes, prompts: PromptSizes):
        self.seed, self.backbone, self.prompts = int(seed), backbone, prompts
        with torch.random.fork_rng(devices=[]), _plain_cpu_defaults():
            torch.default_generator.manual_seed(self.seed)  # the CPU generator only
            _replay_clip_build(backbone)
            self._initial_prompts = _replay_prompt_learner(backbone, prompts)
            _replay_vv_surgery(backbone, prompts)
            self._after_setup = torch.default_generator.get_state()

    @property
    def initial_prompts(self) -> dict[str, torch.Tensor]:
        """The original's initial prompt-learner state (``glocal`` style), as fresh tensors."""
        return {k: v.clone() for k, v in self._initial_prompts.items()}

    def epoch_order(self, epoch: int, n: int) -> torch.Tensor:
        """The sample order of 0-based ``epoch`` over ``n`` samples: the original's DataLoader
        draws the iterator's base seed, then the sampler's seed s, then shuffles with seed s."""
        if epoch < 0 or n < 1:
            raise ValueError(f"need epoch >= 0 and n >= 1, got epoch {epoch}, n {n}")
        generator = torch.Generator()
        generator.set_state(self._after_setup)
        for _ in range(2 * epoch):  # the earlier epochs' two draws each
            _draw_int64(generator)
        _draw_int64(generator)  # this epoch's iterator base seed (workers' seeds; unused here)
        sampler_seed = _draw_int64(generator)
        shuffle = torch.Generator().manual_seed(sampler_seed)
        return torch.randperm(n, generator=shuffle, device="cpu")  # [n]

    def epoch_batches(self, epoch: int, n: int, batch_size: int) -> list[torch.Tensor]:
        """The epoch's batches of dataset indices; the last one partial, as the original kept it."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return list(self.epoch_order(epoch, n).split(batch_size))

