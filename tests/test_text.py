"""Prompt layout and the deep-token text encoder (docs/design.md §3)."""
from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F

from glocalclip import GlocalCLIP, GlocalCLIPConfig
from glocalclip.model.text import DeepPromptTextEncoder

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
    # a block's input is what its first LayerNorm reads (the blocks are run by our own loop)
    hooks = [blk.ln_1.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().clone()))
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


# --------------------------------------------------------------------------------------------------
# The text tower checked against CLIP itself (open_clip's ``CLIP.encode_text``).

SENTENCES = ["a photo of a damaged object.", "x", "flawless metal nut with a scratch on its left side .",
             " ".join(["word"] * 60)]


@pytest.fixture(scope="module")
def varied_clip(tiny_clip):
    """A copy of the tiny CLIP whose ln_final / positional embedding are far from their init
    (LayerNorm weight 1, bias 0), so that skipping or misplacing them shows in the features."""
    clip = copy.deepcopy(tiny_clip)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        clip.ln_final.weight.copy_(1 + 0.5 * torch.randn(clip.ln_final.weight.shape, generator=g))
        clip.ln_final.bias.copy_(0.5 * torch.randn(clip.ln_final.bias.shape, generator=g))
        clip.positional_embedding.add_(0.1 * torch.randn(clip.positional_embedding.shape, generator=g))
    clip.requires_grad_(False)
    return clip.eval()


def _clip_text_features(clip, tokens):
    with torch.no_grad():
        return F.normalize(clip.encode_text(tokens).float(), dim=-1)


def test_encoder_without_deep_tokens_equals_open_clip_encode_text(varied_clip):
    # depth=1: no block gets deep tokens, so the tower must be CLIP's own text tower
    tokens = open_clip.tokenize(SENTENCES)
    eot = tokens.argmax(dim=-1)
    assert len(set(eot.tolist())) == len(SENTENCES)  # different EOT rows per sequence
    enc = DeepPromptTextEncoder(varied_clip, depth=1, t_n_ctx=2)
    with torch.no_grad():
        ours = enc(varied_clip.token_embedding(tokens), eot, [])
    ref = _clip_text_features(varied_clip, tokens)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # the comparison has teeth: the row before EOT gives clearly different features
    with torch.no_grad():
        off = enc(varied_clip.token_embedding(tokens), eot - 1, [])
    assert (off - ref).abs().max() > 1e-2


def test_model_encode_text_with_depth_1_equals_clip_on_the_placeholder_prompts(varied_clip):
    # Through the whole model: prompt learner + encoder + split. With the contexts set to the
    # embedding of the placeholder word and no deep tokens, the features are CLIP's for the tokens.
    model = GlocalCLIP(tiny_config(depth=1), clip=varied_clip)
    pl = model.prompt_learner
    x_row = varied_clip.token_embedding.weight[open_clip.tokenize(["X"])[0, 1]]
    with torch.no_grad():
        for name in ("ctx_global_pos", "ctx_global_neg", "ctx_local_pos", "ctx_local_neg"):
            p = getattr(pl, name)
            p.copy_(x_row.expand_as(p))
        g, l = model.encode_text()
    ref = _clip_text_features(varied_clip, pl.tokens)
    torch.testing.assert_close(g, ref[:2], rtol=0, atol=1e-6)
    torch.testing.assert_close(l, ref[2:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("depth", [1, 3])
def test_feature_is_causal_up_to_the_eot_token(varied_clip, depth):
    torch.manual_seed(11)
    model = GlocalCLIP(tiny_config(depth=depth, t_n_ctx=2), clip=varied_clip)
    enc = model.text_encoder
    with torch.no_grad():
        prompts, eot, deep = model.prompt_learner()
        f0 = enc(prompts, eot, deep)
        after = prompts.clone()
        for p, e in enumerate(eot.tolist()):
            after[p, e + 1:] = torch.randn_like(after[p, e + 1:])
        torch.testing.assert_close(enc(after, eot, deep), f0, rtol=0, atol=1e-6)
        t = model.cfg.t_n_ctx
        for pos in ("eot", "before_eot", "first_after_deep"):
            before = prompts.clone()
            for p, e in enumerate(eot.tolist()):
                k = {"eot": e, "before_eot": e - 1, "first_after_deep": 1 + t}[pos]
                before[p, k] += torch.randn_like(before[p, k])
            f1 = enc(before, eot, deep)
            assert ((f1 - f0).norm(dim=-1) > 1e-3).all(), pos


def _trace_blocks(model, clip, fn):
    """Each text block's input and output, recorded where the text encoder runs a block."""
    inputs, outputs = {}, {}
    index = {id(blk): i for i, blk in enumerate(clip.transformer.resblocks)}
    run = model.text_encoder._run_block

    def traced(block, x):
        out = run(block, x)
        inputs[index[id(block)]], outputs[index[id(block)]] = x.detach().clone(), out.detach().clone()
        return out

    model.text_encoder._run_block = traced
    try:
        result = fn()
    finally:
        del model.text_encoder._run_block
    return result, inputs, outputs


@pytest.mark.parametrize("depth", [2, 4])
def test_outside_the_deep_span_every_block_runs_as_in_clip(varied_clip, depth):
    # docs/design.md §3.2: before blocks 2..D only positions 1..t are overwritten; SOS and positions > t
    # carry the previous block's output; every block runs with CLIP's causal mask; the tail is
    # ln_final -> EOT row -> text_projection -> L2-normalise.
    torch.manual_seed(5)
    t = 2
    model = GlocalCLIP(tiny_config(depth=depth, t_n_ctx=t), clip=varied_clip)
    blocks = varied_clip.transformer.resblocks
    assert varied_clip.transformer.batch_first
    with torch.no_grad():
        prompts, eot, deep = model.prompt_learner()
        feats, inputs, outputs = _trace_blocks(model, varied_clip, lambda: model.text_encoder(prompts, eot, deep))
        assert sorted(inputs) == sorted(outputs) == list(range(len(blocks)))
        torch.testing.assert_close(inputs[0], prompts + varied_clip.positional_embedding, rtol=0, atol=0)
        for i in range(1, len(blocks)):
            x_in, prev = inputs[i], outputs[i - 1]
            if i < depth:
                torch.testing.assert_close(x_in[:, :1], prev[:, :1], rtol=0, atol=0)
                torch.testing.assert_close(x_in[:, 1 + t:], prev[:, 1 + t:], rtol=0, atol=0)
                z = deep[i - 1].half().float().expand(x_in.shape[0], -1, -1)
                torch.testing.assert_close(x_in[:, 1:1 + t], z, rtol=0, atol=0)
            else:
                torch.testing.assert_close(x_in, prev, rtol=0, atol=0)
        for i, blk in enumerate(blocks):  # each block as CLIP runs it: with the causal mask
            x_in = inputs[i]
            ref = blk(x_in, attn_mask=varied_clip.attn_mask)
            torch.testing.assert_close(outputs[i], ref, rtol=0, atol=1e-6)
        last = varied_clip.ln_final(outputs[len(blocks) - 1])
        ref = F.normalize(last[torch.arange(len(eot)), eot] @ varied_clip.text_projection, dim=-1)
    torch.testing.assert_close(feats, ref, rtol=0, atol=1e-6)


def test_prompt_parameters_start_from_n_0_002(tiny_clip):
    """docs/design.md §3.1: every learnable context and deep token is drawn from N(0, 0.02²), in fp32, and they
    are the only trainable parameters (no unused projection layers)."""
    from glocalclip import GlocalCLIP

    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(n_ctx=12, ab_ctx=12, depth=4, t_n_ctx=4), clip=tiny_clip)
    named = dict(model.prompt_learner.named_parameters())
    assert all(p.dtype == torch.float32 for p in named.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"prompt_learner.{n}" for n in named}
    values = torch.cat([p.detach().flatten() for p in named.values()])
    assert values.numel() > 2000
    assert abs(values.mean().item()) < 0.003 and 0.018 < values.std().item() < 0.022
