"""CLIP's text tower with deep learnable tokens (docs/design.md §3.2).

Before text blocks 2..D (1-based), positions 1..t of every sequence are overwritten by the
deep token Z_{i} shared by all prompts. As in the original code, Z is rounded to fp16 and back
before insertion (which also rounds its gradient). The frozen open_clip modules are read, not
changed; the loop over blocks and each block's forward are ours (``attention.standard_block``:
fp32 residual stream, matrix products in the dtype of the block's weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import check_attention, standard_block, sdpa_kernel


class DeepPromptTextEncoder(nn.Module):
    def __init__(self, clip: nn.Module, depth: int, t_n_ctx: int):
        super().__init__()
        n_blocks = len(clip.transformer.resblocks)
        if depth > n_blocks:
            raise ValueError(f"depth {depth} exceeds the text tower's {n_blocks} blocks "
                             f"(deep tokens go before blocks 2..depth)")
        if getattr(clip, "text_projection", None) is None or isinstance(clip.text_projection, nn.Linear):
            raise ValueError("the text tower must have a CLIP text_projection matrix")
        self.transformer = clip.transformer
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        for block in self.transformer.resblocks:
            check_attention(block.attn)
        # the causal mask in the dtype of the blocks' weights, once (not per block and call)
        mask_dtype = self.transformer.resblocks[0].attn.in_proj_weight.dtype
        self.register_buffer("attn_mask", clip.attn_mask.to(mask_dtype), persistent=False)
        self.depth = depth
        self.t_n_ctx = t_n_ctx

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One causal block on batch-first fp32 tokens [P, L, W]."""
        return standard_block(block, x, sdpa_kernel, attn_mask=self.attn_mask)

    def forward(self, prompts: torch.Tensor, eot_indices: torch.Tensor,
                deep_tokens: list[torch.Tensor]) -> torch.Tensor:
        """``prompts`` [P, L, W] embedded tokens; returns L2-normalised features [P, E]."""
        t = self.t_n_ctx
        x = prompts + self.positional_embedding.to(prompts.dtype)
        for i, block in enumerate(self.transformer.resblocks):
            if 1 <= i < self.depth:
                z = deep_tokens[i - 1].half()  # the original's fp16 round trip, always
                z = z.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], z, x[:, 1 + t:]], dim=1)
            x = self._run_block(block, x)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_indices]
        x = x @ self.text_projection
        return F.normalize(x.float(), dim=-1)
