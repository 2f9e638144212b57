"""The original code's vision encoder, re-implemented plainly as the baseline of ``bench.cpu_limit``.

It follows the original forward step by step (docs/design.md §2.2-2.4), reading the weights of an
open_clip vision tower (nothing is copied or written to): sequence-first tokens; the standard
blocks through ``nn.MultiheadAttention``'s functional form; in the last ``dpam_layer - 1`` blocks
the original's two-path attention, i.e. two explicit ``q @ kᵀ``, two softmaxes, two ``@ v`` and
two out-projections, with its in-place additions (the V-V stream added into the tensor the last
standard block returned, so the selected layers alias it); every selected layer then goes
through ``ln_post`` and the projection, aliased ones included; the global feature is the class
token of the standard stream times ``proj``, without ``ln_post``. The positional table is resized
bilinearly once per grid (the original wrote the resized table back into the parameter).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OriginalVisionEncoder(nn.Module):
    def __init__(self, visual: nn.Module, features_list: tuple[int, ...], dpam_layer: int):
        super().__init__()
        self.visual = visual
        self.features_list = tuple(features_list)
        self.n_dual = dpam_layer - 1
        self._pos: dict[tuple[int, int], torch.Tensor] = {}

    def _positional(self, new_side: int) -> torch.Tensor:
        table = self.visual.positional_embedding
        side = int((table.shape[0] - 1) ** 0.5)
        if side == new_side:
            return table
        if (side, new_side) not in self._pos:
            c = table.shape[-1]
            new_pos = table[1:, :].reshape(-1, side, side, c).permute(0, 3, 1, 2)
            new_pos = F.interpolate(new_pos, (new_side, new_side), mode="bilinear")
            new_pos = new_pos.reshape(-1, c, new_side * new_side).transpose(1, 2)
            self._pos[(side, new_side)] = torch.cat([table[:1, :], new_pos[0]], 0)
        return self._pos[(side, new_side)]

    @staticmethod
    def _standard(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [N, B, C]: x + attn(ln_1(x)); x + mlp(ln_2(x)), attention as nn.MultiheadAttention
        (batch_first=False) computes it."""
        a = block.attn
        h = block.ln_1(x)
        y = F.multi_head_attention_forward(h, h, h, a.embed_dim, a.num_heads, a.in_proj_weight, a.in_proj_bias,
                                           None, None, False, 0.0, a.out_proj.weight, a.out_proj.bias,
                                           training=False, need_weights=False)[0]
        x = x + y
        return x + block.mlp(block.ln_2(x))

    @staticmethod
    def _two_path_attention(a: nn.MultiheadAttention, x: torch.Tensor) -> list[torch.Tensor]:
        """The original ``Attention.forward`` on [B, N, C]: returns [V-V output, standard output]."""
        b, n, c = x.shape
        heads = a.num_heads
        scale = (c // heads) ** -0.5
        qkv = F.linear(x, a.in_proj_weight, a.in_proj_bias).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        k = v
        q = k
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        x_ori = (attn_ori @ v).transpose(1, 2).reshape(b, n, c)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return [F.linear(x, a.out_proj.weight, a.out_proj.bias), F.linear(x_ori, a.out_proj.weight, a.out_proj.bias)]

    def _dual(self, block: nn.Module, x):
        def attention(h):
            y, y_ori = self._two_path_attention(block.attn, h.transpose(0, 1))
            return [y.transpose(0, 1), y_ori.transpose(0, 1)]

        if isinstance(x, list):
            x, x_ori = x
            x_res, x_ori_res = attention(block.ln_1(x_ori))
            x_ori += x_ori_res
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))
            x += x_res
            return [x, x_ori]
        x_res, x_ori_res = attention(block.ln_1(x))
        x_ori = x + x_ori_res
        x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        x += x_res  # in place: the tensor the last standard block returned
        return [x, x_ori]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        vis = self.visual
        x = vis.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([vis.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype),
                       x], dim=1)
        x = x + self._positional(int((x.shape[1] - 1) ** 0.5)).to(x.dtype)
        x = vis.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
        blocks = vis.transformer.resblocks
        first_dual = len(blocks) - self.n_dual
        out_tokens = []
        for idx, block in enumerate(blocks, start=1):
            x = self._standard(block, x) if idx <= first_dual else self._dual(block, x)
            if idx in self.features_list:
                out_tokens.append(x[0] if isinstance(x, list) else x)
        x_ori = x[1] if isinstance(x, list) else x
        patches = [vis.ln_post(t.permute(1, 0, 2)) @ vis.proj for t in out_tokens]
        return x_ori[0, :, :] @ vis.proj, patches
