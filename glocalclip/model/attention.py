"""Attention kernels and one CLIP block run on an fp32 residual stream with weights of any dtype.

Both the standard and the V-V attention (docs/design.md §2.3) are softmax(A Bᵀ·s)·V over the same
V: a kernel takes the (query, key) pairs and V once, and returns the outputs stacked along the
batch, so one out-projection serves both paths. Which kernel runs is chosen per device and
dtype from measurements (``bench/cpu_limit.py``, docs/speed.md): on the CPU in bf16 a blocked
matmul + in-place softmax beats PyTorch's fused CPU kernel by about 1.5x; everywhere else
``scaled_dot_product_attention`` is the fastest.

A block computes LayerNorm and the residual additions in fp32 and casts the LayerNorm'd input to
the dtype of its weights for the matrix products; the weights were cast once when the model was
built (``precision.cast_frozen_towers``). With fp32 weights every step is what open_clip's block
does.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: (query, key) pairs, each [B, H, N, D], sharing V [B, H, N, D] -> [len(pairs) * B, H, N, D]
AttentionKernel = Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]], torch.Tensor], torch.Tensor]

#: (batch x head) slices per blocked matrix product: two 1370 x 1370 bf16 score matrices (7.5 MB)
#: measured fastest on a 2-core AMD EPYC (docs/speed.md); 1 and 4 are within a few percent
BLOCK_HEADS = 2


def sdpa_kernel(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], v: torch.Tensor) -> torch.Tensor:
    """PyTorch's fused attention, all pairs in one call (one launch on a GPU)."""
    if len(pairs) == 1:
        q, k = pairs[0]
        return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(torch.cat([q for q, _ in pairs]), torch.cat([k for _, k in pairs]),
                                          torch.cat([v] * len(pairs)))


def blocked_kernel(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], v: torch.Tensor,
                   block: int = BLOCK_HEADS) -> torch.Tensor:
    """softmax(Q Kᵀ·s)·V a few heads at a time: a batched matrix product for the scores, the
    softmax written over them in place, a second product straight into the output. The scores of
    ``block`` heads stay in the cache between the three steps; no input is concatenated."""
    b, h, n, d = v.shape
    vf = v.reshape(b * h, n, d)
    out = v.new_empty(len(pairs), b * h, n, d)
    for p, (q, k) in enumerate(pairs):
        qf = (q * d ** -0.5).reshape(b * h, n, d)
        kf = k.reshape(b * h, n, d)
        for i in range(0, b * h, block):
            scores = torch.bmm(qf[i:i + block], kf[i:i + block].transpose(1, 2))  # [block, N, N]
            torch.softmax(scores, dim=-1, out=scores)  # fp32 inside, rounded once to the dtype
            torch.bmm(scores, vf[i:i + block], out=out[p, i:i + block])
    return out.view(len(pairs) * b, h, n, d)


KERNELS: dict[str, AttentionKernel] = {"sdpa": sdpa_kernel, "blocked": blocked_kernel}


def kernel_name_for(device: torch.device, dtype: torch.dtype) -> str:
    """The measured fastest kernel (docs/speed.md): blocked for bf16 on the CPU, else SDPA (fp32
    on the CPU: PyTorch's fused kernel is 2-3x the blocked one; on a GPU: flash attention)."""
    return "blocked" if device.type == "cpu" and dtype == torch.bfloat16 else "sdpa"


def kernel_for(device: torch.device, dtype: torch.dtype) -> AttentionKernel:
    return KERNELS[kernel_name_for(device, dtype)]


def split_heads(attn: nn.MultiheadAttention, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V [B, H, N, D] of LayerNorm'd tokens ``h`` [B, N, C] through the packed in-projection,
    heads split as ``nn.MultiheadAttention`` splits them (one contiguous copy for all three)."""
    b, n, c = h.shape
    heads = attn.num_heads
    qkv = F.linear(h.to(attn.in_proj_weight.dtype), attn.in_proj_weight, attn.in_proj_bias)
    qkv = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).contiguous()  # [3, B, H, N, D]
    return qkv[0], qkv[1], qkv[2]


def merge_heads(attn: nn.MultiheadAttention, out: torch.Tensor) -> torch.Tensor:
    """[G, H, N, D] attention outputs -> [G, N, C] through the out-projection."""
    g, heads, n, d = out.shape
    out = out.transpose(1, 2).reshape(g, n, heads * d)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def check_attention(attn: nn.Module) -> None:
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None \
            or not getattr(attn, "_qkv_same_embed_dim", True):
        raise ValueError("the block's attention must be an nn.MultiheadAttention with a packed in-projection "
                         "(CLIP's attention has one)")


def mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x + LayerScale(MLP(LN₂(x))): LayerNorm in fp32, the MLP in its weights' dtype."""
    h = block.ln_2(x).to(block.attn.in_proj_weight.dtype)  # the block's matrices share one dtype
    return x + block.ls_2(block.mlp(h))


def standard_block(block: nn.Module, x: torch.Tensor, kernel: AttentionKernel,
                   attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` on batch-first tokens ``x`` [B, N, C] (fp32): the same
    function, with the matrix products in the dtype of the block's weights. ``attn_mask`` (the
    text tower's causal mask, additive) goes to SDPA whatever ``kernel`` is."""
    attn = block.attn
    q, k, v = split_heads(attn, block.ln_1(x))
    if attn_mask is None:
        out = kernel([(q, k)], v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype))
    x = x + block.ls_1(merge_heads(attn, out))
    return mlp_residual(block, x)
