"""V-V attention surgery on open_clip's vision tower ("DPAM", dual path), by composition.

The last ``dpam_layer - 1`` blocks are wrapped, not edited: a :class:`DualPathBlock` holds the
original open_clip block and reuses its LayerNorms, packed in-projection, out-projection and MLP.
It runs the block exactly as CLIP does on the *original* stream ``o`` and, from the same
LayerNorm'd input, a V-V attention (query and key replaced by the value) whose output is added
to a second *V-V* stream ``v``. ``v`` never feeds an attention, LayerNorm or MLP, and skips the
FFN (docs/design.md §2.3). No pretrained tensor is written to.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .attention import check_attention, kernel_for, merge_heads, mlp_residual, split_heads, standard_block
from .layers import LayerFeatures


class VVAttention(nn.Module):
    """Both attentions of one block from its ``nn.MultiheadAttention`` weights.

    Returns ``(y_ori, y_vv)``: standard softmax(QKᵀ·s)V and V-V softmax(VVᵀ·s)V, each through the
    block's out-projection, in the dtype of the block's weights. Heads split as
    ``nn.MultiheadAttention`` does; no mask, no dropout. The kernel is the measured fastest for
    the device and dtype (``attention.kernel_for``).
    """

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        check_attention(attn)
        self.attn = attn  # shared, frozen; we only read its parameters

    def forward(self, h: torch.Tensor, class_row_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``h``: LayerNorm'd tokens, batch-first [B, N, C]. With ``class_row_only`` the standard
        attention is computed for the class token's query alone: ``y_ori`` is [B, 1, C], the rows
        that the last block's standard path needs (docs/speed.md, "bf16 on the CPU")."""
        attn = self.attn
        q, k, v = split_heads(attn, h)
        kernel = kernel_for(v.device, v.dtype)
        if class_row_only:
            y_vv = merge_heads(attn, kernel([(v, v)], v))
            y_cls = merge_heads(attn, F.scaled_dot_product_attention(q[:, :, :1], k, v))  # [B, 1, C]
            return y_cls, y_vv
        out = merge_heads(attn, kernel([(q, k), (v, v)], v))  # rows [0, B): Q·Kᵀ, rows [B, 2B): V·Vᵀ
        b = h.shape[0]
        return out[:b], out[b:]


class DualPathBlock(nn.Module):
    """One open_clip ``ResidualAttentionBlock`` run on two residual streams (see module doc)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name in ("ln_1", "attn", "ln_2", "mlp"):
            if not hasattr(block, name):
                raise TypeError(f"expected an open_clip ResidualAttentionBlock, {type(block).__name__} "
                                f"has no {name!r}")
        self.block = block
        self.vv_attention = VVAttention(block.attn)

    def forward(self, o: torch.Tensor, v: torch.Tensor, class_row_only: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``o``, ``v``: the two fp32 streams [B, N, C]; LayerNorms and additions stay fp32. With
        ``class_row_only`` (the last block, whose standard stream only gives the class token) the
        returned ``o`` is the class row alone, [B, 1, C]: every op on that stream is row-wise after
        the attention, so the other rows are never computed."""
        blk = self.block
        y_ori, y_vv = self.vv_attention(blk.ln_1(o), class_row_only)
        if class_row_only:
            o = o[:, :1]
        o = o + blk.ls_1(y_ori)
        o = mlp_residual(blk, o)
        # LayerScale is the identity in CLIP; applying it to the V-V path too keeps both paths the
        # same function of the attention output for models that have one.
        v = v + blk.ls_1(y_vv)
        return o, v


class PositionalEmbeddingCache(nn.Module):
    """The positional table of a vision tower resized to a patch grid, computed once per
    (grid, device, dtype). Bilinear, align_corners=False, no antialias, as the original code did;
    the pretrained parameter itself is never written to."""

    def __init__(self, positional_embedding: torch.Tensor):
        super().__init__()
        self.source = positional_embedding
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        src = self.source
        key = (grid, src.device, src.dtype, src._version)
        table = self._cache.get(key)
        if table is None:
            with torch.no_grad():
                table = self._resize(src.detach(), grid)
            self._cache = {key: table}
        return table

    @staticmethod
    def _resize(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        n, c = table.shape
        side = int(round((n - 1) ** 0.5))
        if side * side != n - 1:
            raise ValueError(f"positional table of {n} rows is not a square grid plus a class row")
        if (side, side) == tuple(grid):
            return table.clone()
        patches = table[1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=tuple(grid), mode="bilinear", align_corners=False)
        patches = patches[0].reshape(c, grid[0] * grid[1]).t()
        return torch.cat([table[:1], patches], dim=0)


class DualPathVisionEncoder(nn.Module):
    """open_clip's ``VisionTransformer`` with the dual-path surgery and multi-layer patch outputs.

    ``features_list`` and ``dpam_layer`` as in docs/design.md §2.3–2.4. ``multilayer="reference"``
    reproduces the original code, where every selected layer from the first modified block on —
    and the last standard block too, whose output tensor the first modified block adds to in
    place — equals the V-V stream after the last block: one tensor, counted once per such layer.
    ``"snapshot"`` takes each layer's own V-V stream (and a standard block's own output before
    the surgery), each counted once.
    """

    def __init__(self, visual: nn.Module, features_list: tuple[int, ...], dpam_layer: int,
                 multilayer: str = "reference", cls_ln_post: bool = False):
        super().__init__()
        blocks = visual.transformer.resblocks
        n_blocks = len(blocks)
        if not 1 <= dpam_layer <= n_blocks + 1:
            raise ValueError(f"dpam_layer must lie in 1..{n_blocks + 1} for a vision tower of "
                             f"{n_blocks} blocks (it modifies the last dpam_layer-1 blocks), got {dpam_layer}")
        bad = [f for f in features_list if not 1 <= f <= n_blocks]
        if bad:
            raise ValueError(f"features_list {list(features_list)} names blocks {bad} outside the "
                             f"vision tower's 1..{n_blocks}")
        if list(features_list) != sorted(set(features_list)):
            raise ValueError(f"features_list must be increasing block numbers (layers are read in block "
                             f"order), got {list(features_list)}")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("vision towers with attentional pooling are not supported")
        self.visual = visual
        self.features_list = tuple(features_list)
        self.multilayer = multilayer
        self.cls_ln_post = cls_ln_post
        self.first_dual = n_blocks - (dpam_layer - 1) + 1  # 1-based index of the first modified block
        self.dual_blocks = nn.ModuleList(DualPathBlock(b) for b in blocks[self.first_dual - 1:])
        self.pos_embed = PositionalEmbeddingCache(visual.positional_embedding)

    @property
    def patch_size(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    def _run_standard(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One unmodified block on batch-first fp32 tokens (the layout open_clip's own flag only
        changes how open_clip calls it)."""
        return standard_block(block, x, kernel_for(x.device, block.attn.in_proj_weight.dtype))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embedding + class token + resized positional table + ln_pre -> [B, N, C], fp32 (the
        residual stream); the patch convolution runs in its weight's dtype."""
        vis = self.visual
        x = vis.conv1(images.to(vis.conv1.weight.dtype)).float()
        b, c, gh, gw = x.shape
        x = x.reshape(b, c, gh * gw).permute(0, 2, 1)
        cls = vis.class_embedding.to(x.dtype).view(1, 1, c).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1)
        x = x + self.pos_embed((gh, gw)).to(x.dtype)
        return vis.ln_pre(x)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """ln_post then the visual projection, on all tokens."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, LayerFeatures]:
        """Return the global image feature [B, E] (not normalised) and the selected layers' projected
        patch tokens [B, N, E] including the class row, each distinct tensor with its count."""
        global_feature, layers, _ = self.forward_with_blocks(images, blocks=False)
        return global_feature, layers

    def forward_with_blocks(self, images: torch.Tensor, blocks: bool = True
                            ) -> tuple[torch.Tensor, LayerFeatures, Optional[LayerFeatures]]:
        """As :meth:`forward`, and with ``blocks`` each selected block's own projected tokens (what
        ``multilayer="snapshot"`` selects, whatever ``multilayer`` is) from the same pass: the
        few-shot bank's distinct-blocks option (docs/design.md §11)."""
        x = self.embed(images)
        selected = set(self.features_list)
        raw: dict[int, torch.Tensor] = {}  # 1-based block -> unprojected tokens of the local branch
        own: dict[int, torch.Tensor] = {}  # 1-based block -> its own V-V stream (references, no copies)
        resblocks = self.visual.transformer.resblocks
        for i in range(1, self.first_dual):
            x = self._run_standard(resblocks[i - 1], x)
            if i in selected:
                raw[i] = x
        o, v = x, x
        for j, dual in enumerate(self.dual_blocks):
            o, v = dual(o, v, class_row_only=j == len(self.dual_blocks) - 1)  # only o[:, 0] is read after
            layer = self.first_dual + j
            if layer in selected:
                own[layer] = v
                if self.multilayer == "snapshot":
                    raw[layer] = v
        layers = self._select_layers(raw, v).map(self.project)  # each distinct tensor projected once
        per_block = None
        if blocks:
            per_block = LayerFeatures.of([self.project({**raw, **own}[f]) for f in self.features_list])
        cls = o[:, 0]
        if self.cls_ln_post:
            cls = self.visual.ln_post(cls)
        global_feature = cls @ self.visual.proj
        return global_feature, layers, per_block

    def _select_layers(self, raw: dict[int, torch.Tensor], v_last: torch.Tensor) -> LayerFeatures:
        """The selected layers' unprojected tokens, in ``features_list`` order.

        Under ``"reference"`` the original kept references to one tensor and added to it in place:
        every selected layer from the last standard block on (its output is the tensor the first
        modified block adds to) ends as ``v_last``, the V-V stream after the last block. Those
        layers close the (sorted) list, so they become one entry counted once per such layer.
        """
        if self.multilayer != "reference" or not self.dual_blocks:
            return LayerFeatures.of([raw[f] for f in self.features_list])
        aliased_from = self.first_dual - 1
        own = [raw[f] for f in self.features_list if f < aliased_from]
        n_aliased = sum(f >= aliased_from for f in self.features_list)
        if n_aliased == 0:
            return LayerFeatures.of(own)
        return LayerFeatures((*own, v_last), (1,) * len(own) + (n_aliased,))
