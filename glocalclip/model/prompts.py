"""The object-agnostic learnable prompts: the only trainable part of GlocalCLIP.

Prompts are tokenised once with placeholder words ("X") in the context slots and embedded by the
frozen token embedding; the learnable contexts are spliced between the start token and the rest
(words, end token, padding) at every call. Two layouts:

``glocal`` (GlocalCLIP, docs/design.md §3.1), batch order [global normal, global anomalous,
local normal, local anomalous]; each anomalous prompt re-uses its branch's normal context::

    SOS GN₁..GNₙ object . EOT            SOS GN₁..GNₙ GA₁..GAₐ damaged object . EOT
    SOS LN₁..LNₙ object . EOT            SOS LN₁..LNₙ LA₁..LAₐ damaged object . EOT

``anomalyclip`` (AnomalyCLIP's released checkpoints): one pair serving both branches, the
anomalous prompt with its own context only: ``SOS P₁..Pₙ object . EOT``, ``SOS Q₁..Qₙ damaged
object . EOT``; batch order [normal, anomalous].
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

PROMPT_INIT_STD = 0.02  # every learnable context and deep token starts from N(0, 0.02²)
NORMAL_WORDS = "object."
ANOMALOUS_WORDS = "damaged object."


def _placeholder_prompt(n_placeholders: int, words: str) -> str:
    return " ".join(["X"] * n_placeholders + [words])


class GlocalPromptLearner(nn.Module):
    """Learnable contexts and the deep tokens shared by all prompts.

    Parameters (fp32, N(0, 0.02²)): ``ctx_global_pos`` [n,W], ``ctx_global_neg`` [a,W],
    ``ctx_local_pos`` [n,W], ``ctx_local_neg`` [a,W] (``glocal``) or ``ctx_pos``/``ctx_neg`` [n,W]
    (``anomalyclip``), and ``compound_prompts_text.{i}`` [t,W] for i < depth-1.
    """

    def __init__(self, token_embedding: nn.Embedding, tokenize: Callable[[list[str]], torch.Tensor],
                 n_ctx: int, ab_ctx: int, depth: int, t_n_ctx: int, style: str = "glocal",
                 context_length: int = 77):
        super().__init__()
        width = token_embedding.weight.shape[1]
        self.style = style
        self.n_ctx, self.ab_ctx, self.depth, self.t_n_ctx = n_ctx, ab_ctx, depth, t_n_ctx

        def param(rows: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(rows, width).normal_(std=PROMPT_INIT_STD))

        if style == "glocal":
            self.ctx_global_pos = param(n_ctx)
            self.ctx_global_neg = param(ab_ctx)
            self.ctx_local_pos = param(n_ctx)
            self.ctx_local_neg = param(ab_ctx)
            n_slots = [n_ctx, n_ctx + ab_ctx, n_ctx, n_ctx + ab_ctx]
            words = [NORMAL_WORDS, ANOMALOUS_WORDS, NORMAL_WORDS, ANOMALOUS_WORDS]
        elif style == "anomalyclip":
            self.ctx_pos = param(n_ctx)
            self.ctx_neg = param(n_ctx)
            n_slots = [n_ctx, n_ctx]
            words = [NORMAL_WORDS, ANOMALOUS_WORDS]
        else:
            raise ValueError(f"unknown prompt style {style!r}; use 'glocal' or 'anomalyclip'")
        self.compound_prompts_text = nn.ParameterList(param(t_n_ctx) for _ in range(depth - 1))

        tokens = tokenize([_placeholder_prompt(k, w) for k, w in zip(n_slots, words)])
        tokens = tokens[:, :context_length]
        longest = max(n_slots) + 4  # SOS + context + up to 2 words + '.' + EOT
        if longest > context_length:
            raise ValueError(f"prompts of {longest} tokens do not fit the context length {context_length}")
        with torch.no_grad():
            embedded = token_embedding(tokens).float()
        # Derived from the frozen CLIP, so not saved: the state dict holds only parameters.
        self.register_buffer("token_prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("tokens", tokens, persistent=False)
        for i, k in enumerate(n_slots):
            self.register_buffer(f"token_suffix_{i}", embedded[i, 1 + k:].clone(), persistent=False)
        self.register_buffer("eot_indices", tokens.argmax(dim=-1), persistent=False)

    def contexts(self) -> list[torch.Tensor]:
        """The context rows of each prompt, in batch order."""
        if self.style == "glocal":
            return [self.ctx_global_pos, torch.cat([self.ctx_global_pos, self.ctx_global_neg]),
                    self.ctx_local_pos, torch.cat([self.ctx_local_pos, self.ctx_local_neg])]
        return [self.ctx_pos, self.ctx_neg]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Return (prompt embeddings [P, 77, W], EOT indices [P], deep tokens [[t, W]] * (depth-1))."""
        rows = []
        for i, ctx in enumerate(self.contexts()):
            suffix = getattr(self, f"token_suffix_{i}")
            rows.append(torch.cat([self.token_prefix[i], ctx.to(suffix.dtype), suffix], dim=0))
        return torch.stack(rows), self.eot_indices, list(self.compound_prompts_text)
