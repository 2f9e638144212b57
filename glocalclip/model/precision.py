"""The one place where ``precision`` becomes arithmetic (docs/speed.md, "bf16 on the CPU").

``precision`` is fixed when a model is built: the frozen towers' weight matrices are cast to the
compute dtype once, in a copy the model owns, so no forward pass casts a weight again (autocast
did, on every call, because its cache only keeps weights that require a gradient). Everything
that accuracy needs in fp32 stays fp32 and is shared with the CLIP it came from, not copied:
LayerNorms, embeddings, positional tables, the output projections. The residual streams run in
fp32; only the matrix products (and the attention between them) run in the compute dtype.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

#: ``GlocalCLIPConfig.precision`` -> the dtype of the frozen towers' matrix products
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: modules whose own parameters (weights and biases) are matrix-product operands
_MATRIX_MODULES = (nn.Linear, nn.MultiheadAttention, nn.Conv2d)


def compute_dtype(precision: str) -> torch.dtype:
    try:
        return COMPUTE_DTYPES[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(COMPUTE_DTYPES)}, got {precision!r}") from None


def matrix_parameters(clip: nn.Module) -> list[nn.Parameter]:
    """The parameters that feed matrix products: every Linear, MultiheadAttention (packed
    in-projection) and Conv2d's own weights and biases. Not LayerNorms, embeddings, positional
    tables or the ``proj`` / ``text_projection`` matrices (those stay fp32)."""
    found: dict[int, nn.Parameter] = {}
    for module in clip.modules():
        if isinstance(module, _MATRIX_MODULES):
            for p in module.parameters(recurse=False):
                found.setdefault(id(p), p)
    return list(found.values())


def cast_frozen_towers(clip: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``clip`` itself for fp32; otherwise a copy whose matrix parameters are ``dtype`` copies
    (frozen) and whose every other parameter and buffer is the very tensor of ``clip`` (shared,
    never written to). ``clip`` is left as it was."""
    if dtype == torch.float32:
        return clip
    memo: dict[int, object] = {}
    for p in matrix_parameters(clip):
        memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    for t in [*clip.parameters(), *clip.buffers()]:
        memo.setdefault(id(t), t)  # shared, not copied: they stay in the precision they have
    return copy.deepcopy(clip, memo)
