"""Prompt layout and the deep-token text encoder (DESIGN.md §3)."""
from __future__ import annotations

import open_clip
import pytest
import torch

from glocalclip import GlocalCLIP, GlocalCLIPConfig

from conftest import tiny_config

SOS, EOT = 49406, 49407


def test_eot_indices_and_token_layout(tiny_model):
    pl = tiny_model.prompt_learner
    n, a = tiny_model.cfg.n_ctx, tiny_model.cfg.ab_ctx
    assert pl.eot_indices.tolist() == [n + 3, n + a + 4, n + 3, n + a + 4]
    x = open_clip.tokenize(["X"])[0, 1].item()
    obj, dot, damaged = open_clip.tokenize(["object . damaged"])[0, 1:4].tolist()
    tok = pl.tokens
    assert tok[:, 0].tolist() == [SOS] * 4
    assert tok[0, 1:n + 1].tolist() == [x] * n and tok[0, n + 1:n + 4].tolist() == [obj, dot, EOT]
    assert tok[1, 1:n + a + 1].tolist() == [x] * (n + a)
    assert tok[1, n + a + 1:n + a + 5].tolist() == [damaged, obj, dot, EOT]


def test_prompt_embeddings_splice_contexts_in_batch_order(tiny_model):
    pl = tiny_model.prompt_learner
    n, a = tiny_model.cfg.n_ctx, tiny_model.cfg.ab_ctx
    prompts, _, deep = pl()
    assert prompts.shape == (4, 77, tiny_model.clip.token_embedding.weight.shape[1])
    torch.testing.assert_close(prompts[0, 1:n + 1], pl.ctx_global_pos)
    torch.testing.assert_close(prompts[1, 1:n + 1], pl.ctx_global_pos)  # re-uses the normal context
    torch.testing.assert_close(prompts[1, n + 1:n + a + 1], pl.ctx_global_neg)
    torch.testing.assert_close(prompts[2, 1:n + 1], pl.ctx_local_pos)
    torch.testing.assert_close(prompts[3, 1:n + 1], pl.ctx_local_pos)
    torch.testing.assert_close(prompts[3, n + 1:n + a + 1], pl.ctx_local_neg)
    emb = tiny_model.clip.token_embedding.weight
    torch.testing.assert_close(prompts[:, 0], emb[SOS].expand(4, -1))
    torch.testing.assert_close(prompts[0, n + 3], emb[EOT])
    assert len(deep) == tiny_model.cfg.depth - 1 and deep[0].shape == (tiny_model.cfg.t_n_ctx, emb.shape[1])


def test_deep_tokens_sit_at_positions_1_to_t_in_blocks_2_to_depth(tiny_clip):
    torch.manual_seed(3)
    model = GlocalCLIP(tiny_config(depth=3, t_n_ctx=2), clip=tiny_clip)
    seen = {}
    hooks = [blk.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
             for i, blk in enumerate(tiny_clip.transformer.resblocks)]
    try:
        model.encode_text()
    finally:
        for h in hooks:
            h.remove()
    t = model.cfg.t_n_ctx
    deep = list(model.prompt_learner.compound_prompts_text)
    for i in (1, 2):  # 0-based blocks 1..depth-1 == 1-based blocks 2..depth
        z = deep[i - 1].detach().half().float()
        for p in range(4):
            torch.testing.assert_close(seen[i][p, 1:1 + t], z, rtol=0, atol=0)
        assert not torch.allclose(seen[i][0, 1 + t], z[0])
    # block 1 sees the prompt context (plus positions), block 4 > depth sees what block 3 made
    for i in (0, 3):
        assert not torch.allclose(seen[i][0, 1:1 + t], deep[0].detach().half().float(), atol=1e-3)
    # the fp16 rounding is really applied: a value that fp16 cannot hold is changed
    assert not torch.equal(deep[0].detach(), deep[0].detach().half().float())


def test_text_features_normalised_and_split(tiny_model):
    g, l = tiny_model.encode_text()
    assert g.shape == (2, 32) and l.shape == (2, 32)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(l.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(g, l)
    assert g.requires_grad


def test_text_features_follow_prompt_changes(tiny_model):
    g0, _ = tiny_model.encode_text()
    with torch.no_grad():
        tiny_model.prompt_learner.ctx_global_neg.add_(0.5)
    g1, l1 = tiny_model.encode_text()
    torch.testing.assert_close(g0[0], g1[0])  # the normal prompt does not read ctx_global_neg
    assert not torch.allclose(g0[1], g1[1])


def test_anomalyclip_prompt_style_layout(tiny_clip):
    model = GlocalCLIP(tiny_config(prompt_style="anomalyclip"), clip=tiny_clip)
    pl = model.prompt_learner
    n = model.cfg.n_ctx
    assert pl.eot_indices.tolist() == [n + 3, n + 4]
    prompts, _, _ = pl()
    torch.testing.assert_close(prompts[1, 1:n + 1], pl.ctx_neg)  # its own context, not the normal one
    g, l = model.encode_text()
    assert torch.equal(g, l) and g.shape == (2, 32)


def test_t_n_ctx_larger_than_n_ctx_is_refused():
    with pytest.raises(ValueError, match="t_n_ctx"):
        GlocalCLIPConfig(backbone="tiny", pretrained=None, n_ctx=3, t_n_ctx=4)
