"""The V-V attention surgery and the vision encoder outputs (docs/design.md §2.2–2.4)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from glocalclip import GlocalCLIP
from glocalclip.model.vision import DualPathVisionEncoder, PositionalEmbeddingCache, VVAttention

from conftest import TINY_SIZE, tiny_config

NATIVE = 56  # the tiny config's native image size (4×4 grid)


def _images(n: int = 2, size: int = TINY_SIZE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _standard_patch_tokens(model: GlocalCLIP, x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """ln_post(output of the first ``n_blocks`` plain open_clip blocks) · proj, computed by hand."""
    vis = model.clip.visual
    with torch.no_grad():
        t = model.visual.embed(x)
        for blk in vis.transformer.resblocks[:n_blocks]:
            t = blk(t)
        return vis.ln_post(t) @ vis.proj


def test_global_stream_equals_open_clip_forward(tiny_clip):
    """With ln_post applied, the original stream's class token is exactly open_clip's image feature."""
    model = GlocalCLIP(tiny_config(image_size=NATIVE, cls_ln_post=True), clip=tiny_clip)
    x = _images(3, NATIVE)
    ours, _ = model.encode_image(x)
    with torch.no_grad():
        ref = tiny_clip.encode_image(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_global_feature_skips_ln_post_by_default(tiny_clip):
    """Faithful quirk: o_last[CLS] · W_proj without ln_post, at a resized grid too."""
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    x = _images(2)
    ours, _ = model.encode_image(x)
    vis = tiny_clip.visual
    with torch.no_grad():
        tokens = model.visual.embed(x)
        tokens = vis.transformer(tokens)  # open_clip's own blocks: the original stream
        ref = tokens[:, 0] @ vis.proj
        with_ln = vis.ln_post(tokens[:, 0]) @ vis.proj
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, with_ln, atol=1e-3)


def test_vv_attention_matches_direct_per_head_computation(tiny_clip):
    block = tiny_clip.visual.transformer.resblocks[5]
    attn = block.attn
    h = torch.randn(2, 17, attn.embed_dim)
    y_ori, y_vv = VVAttention(attn)(h)

    heads, c = attn.num_heads, attn.embed_dim
    d = c // heads
    w_q, w_k, w_v = attn.in_proj_weight.split(c)
    b_q, b_k, b_v = attn.in_proj_bias.split(c)
    q, k, v = h @ w_q.t() + b_q, h @ w_k.t() + b_k, h @ w_v.t() + b_v
    outs_ori, outs_vv = [], []
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        qi, ki, vi = q[..., sl], k[..., sl], v[..., sl]
        a_ori = torch.softmax(qi @ ki.transpose(1, 2) * d ** -0.5, dim=-1)
        a_vv = torch.softmax(vi @ vi.transpose(1, 2) * d ** -0.5, dim=-1)
        outs_ori.append(a_ori @ vi)
        outs_vv.append(a_vv @ vi)
    ref_ori = torch.cat(outs_ori, -1) @ attn.out_proj.weight.t() + attn.out_proj.bias
    ref_vv = torch.cat(outs_vv, -1) @ attn.out_proj.weight.t() + attn.out_proj.bias
    torch.testing.assert_close(y_ori, ref_ori, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_vv, ref_vv, rtol=1e-5, atol=1e-5)
    # the standard path is exactly nn.MultiheadAttention's
    with torch.no_grad():
        mha = attn(h, h, h, need_weights=False)[0]
    torch.testing.assert_close(y_ori, mha, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_ori, y_vv, atol=1e-3)


def test_vv_stream_skips_ffn_and_never_feeds_the_original_stream(tiny_clip):
    """Changing the last block's MLP changes the global feature but not the V-V patch tokens."""
    clip2 = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        clip2.visual.transformer.resblocks[-1].mlp.c_fc.weight.mul_(3.0)
    cfg = tiny_config(multilayer="snapshot")
    a, b = GlocalCLIP(cfg, clip=tiny_clip), GlocalCLIP(cfg, clip=clip2)
    x = _images(2)
    ga, pa = a.encode_image(x)
    gb, pb = b.encode_image(x)
    assert not torch.allclose(ga, gb, atol=1e-4)
    torch.testing.assert_close(pa[-1], pb[-1], rtol=0, atol=0)


def test_vv_stream_recurrence_matches_a_hand_loop(tiny_clip):
    """v = x_{first-1} + Σ y_vv(LN1(o)) with o the plain CLIP stream; patches = ln_post(v)·proj."""
    model = GlocalCLIP(tiny_config(multilayer="snapshot"), clip=tiny_clip)
    x = _images(1)
    _, patches = model.encode_image(x)
    blocks = tiny_clip.visual.transformer.resblocks
    first = model.visual.first_dual
    with torch.no_grad():
        o = model.visual.embed(x)
        for blk in blocks[: first - 1]:
            o = blk(o)
        v = o.clone()
        per_layer = {}
        for i, blk in enumerate(blocks[first - 1:], start=first):
            _, y_vv = VVAttention(blk.attn)(blk.ln_1(o))
            v = v + y_vv
            o = blk(o)
            per_layer[i] = tiny_clip.visual.ln_post(v) @ tiny_clip.visual.proj
    for f, p in zip(model.cfg.features_list, patches):
        if f >= first:
            torch.testing.assert_close(p, per_layer[f], rtol=1e-5, atol=1e-5)


def test_reference_layers_identical_snapshot_layers_differ(tiny_clip):
    x = _images(2)
    ref = GlocalCLIP(tiny_config(multilayer="reference"), clip=tiny_clip)
    snap = GlocalCLIP(tiny_config(multilayer="snapshot"), clip=tiny_clip)
    _, pr = ref.encode_image(x)
    _, ps = snap.encode_image(x)
    first = ref.visual.first_dual  # features (2,4,6,8), first modified block 4
    assert first == 4
    late = [i for i, f in enumerate(ref.cfg.features_list) if f >= first]
    for i in late:
        torch.testing.assert_close(pr[i], pr[late[-1]], rtol=0, atol=0)
    torch.testing.assert_close(pr[late[-1]], ps[late[-1]], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ps[late[0]], ps[late[-1]], atol=1e-3)
    # layer 2 precedes the surgery: a standard block's own output, the same in both modes
    torch.testing.assert_close(pr[0], ps[0], rtol=0, atol=0)
    assert not torch.allclose(pr[0], pr[late[-1]], atol=1e-3)
    torch.testing.assert_close(pr[0], _standard_patch_tokens(ref, x, 2), rtol=1e-5, atol=1e-5)


def test_pretrained_weights_bitwise_unchanged_after_forwards(tiny_clip):
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    for size in (TINY_SIZE, 84):
        model = GlocalCLIP(tiny_config(image_size=size), clip=tiny_clip)
        out = model(_images(2, size))
        assert out["anomaly_map"].shape == (2, size, size)
        model.losses(_images(2, size), torch.zeros(2, size, size), torch.tensor([0, 1]))["total"].backward()
    after = tiny_clip.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert tiny_clip.visual.positional_embedding.shape[0] == 17  # 4×4 + CLS, never resized in place


def test_positional_table_resized_bilinearly_and_cached(tiny_clip):
    pos = tiny_clip.visual.positional_embedding
    cache = PositionalEmbeddingCache(pos)
    t8 = cache((8, 8))
    assert t8.shape == (65, pos.shape[1])
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)[0].reshape(pos.shape[1], 64).t()
    torch.testing.assert_close(t8[1:], ref)
    torch.testing.assert_close(t8[0], pos[0])
    assert cache((8, 8)) is t8  # computed once per size
    assert torch.equal(cache((4, 4)), pos)


def test_sequence_first_blocks_give_the_same_result(tiny_clip):
    """Older open_clip runs blocks sequence-first; the encoder must check, not assume."""
    clip2 = copy.deepcopy(tiny_clip)
    clip2.visual.transformer.batch_first = False
    for blk in clip2.visual.transformer.resblocks:
        blk.attn.batch_first = False
    clip2.transformer.batch_first = False
    for blk in clip2.transformer.resblocks:
        blk.attn.batch_first = False
    x = _images(2)
    torch.manual_seed(0)
    a = GlocalCLIP(tiny_config(), clip=tiny_clip)
    torch.manual_seed(0)
    b = GlocalCLIP(tiny_config(), clip=clip2)
    oa, ob = a(x), b(x)
    torch.testing.assert_close(oa["anomaly_map"], ob["anomaly_map"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(oa["image_score"], ob["image_score"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(features_list=(2, 9)), "outside the vision tower"),
    (dict(dpam_layer=10), "dpam_layer"),
    (dict(depth=5), "depth 5 exceeds"),
])
def test_out_of_range_layers_are_refused(tiny_clip, changes, message):
    with pytest.raises(ValueError, match=message):
        GlocalCLIP(tiny_config(**changes), clip=tiny_clip)


def test_wrong_input_shape_is_refused(tiny_model):
    with pytest.raises(ValueError, match="image_size"):
        tiny_model(_images(1, 84))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny_model.encode_image(torch.zeros(3, TINY_SIZE, TINY_SIZE))


def test_reference_mode_also_aliases_the_last_standard_block(tiny_clip):
    """In the original the first modified block adds to its input tensor in place, so a selected
    last standard block (here block 3, first modified block 4) also ends as the final V-V stream;
    in snapshot mode it stays that block's own output."""
    x = _images(1)
    ref = GlocalCLIP(tiny_config(features_list=(2, 3, 4, 8)), clip=tiny_clip)
    snap = GlocalCLIP(tiny_config(features_list=(2, 3, 4, 8), multilayer="snapshot"), clip=tiny_clip)
    _, pr = ref.encode_image(x)
    _, ps = snap.encode_image(x)
    assert ref.visual.first_dual == 4
    torch.testing.assert_close(pr[1], pr[3], rtol=0, atol=0)  # block 3 == V-V after block 8
    assert not torch.allclose(pr[0], pr[3], atol=1e-3)        # block 2 is untouched
    torch.testing.assert_close(ps[1], _standard_patch_tokens(snap, x, 3), rtol=1e-5, atol=1e-5)


def test_features_list_is_read_once_per_block_in_block_order(tiny_clip):
    cfg = tiny_config(features_list=(8, 2, 6, 2, 4))
    assert cfg.features_list == (2, 4, 6, 8)
    model = GlocalCLIP(cfg, clip=tiny_clip)
    _, patches = model.encode_image(_images(1))
    assert len(patches) == 4


def test_forward_returns_exactly_the_documented_keys(tiny_model):
    assert set(tiny_model(_images(1))) == {"image_score", "anomaly_map"}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_moves_outputs_by_the_formats_rounding(tiny_clip, precision):
    """bf16/fp16 only change the arithmetic of the frozen encoders: the outputs move (so the reduced
    precision really runs), by about the format's rounding, and stay float32 and finite."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    ref_model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    low_model = GlocalCLIP(tiny_config(precision=precision), clip=tiny_clip)
    low_model.prompt_learner.load_state_dict(ref_model.prompt_learner.state_dict())
    with torch.no_grad():
        ref, low = ref_model(x), low_model(x)
        g_ref, _ = ref_model.encode_text()
        g_low, _ = low_model.encode_text()
        _, p_ref = ref_model.encode_image(x)
        _, p_low = low_model.encode_image(x)
    eps = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}[precision]  # the format's relative rounding
    for key in ("image_score", "anomaly_map"):
        assert low[key].dtype == torch.float32 and torch.isfinite(low[key]).all()
        delta = (low[key] - ref[key]).abs().max().item()
        # measured: ~5 eps (bf16) and ~3 eps (fp16) of the output's scale after the tiny tower's layers
        assert 0 < delta < 16 * eps * ref[key].abs().max().item(), (key, delta)
    assert 0 < (g_low.float() - g_ref).abs().max().item() < 16 * eps
    for a, b in zip(p_low, p_ref):  # patch features: within a few percent of their scale
        assert a.dtype == torch.float32
        assert 0 < (a - b).abs().max().item() < 0.03 * b.abs().max().item()


def _weight_casts(model: GlocalCLIP, fn) -> list[str]:
    """The dtype conversions that read one of the frozen CLIP's tensors while ``fn`` runs (every
    tensor operation is seen, whatever module or kernel calls it). The prompts are not counted:
    the deep tokens' fp16 round trip is the original's, on trainable parameters."""
    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr() for p in model.clip.parameters()} | {b.data_ptr() for b in model.text_encoder.buffers()}
    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                src = args[1] if func is torch.ops.aten.copy_.default else args[0]
                if isinstance(src, torch.Tensor) and src.numel() > 1 and src.data_ptr() in weights:
                    seen.append(f"{func} of a {tuple(src.shape)} {src.dtype} weight")
            return func(*args, **kwargs)

    with Watch():
        fn()
    return seen


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_casts_the_towers_once_into_a_copy(tiny_clip, precision):
    """The towers' matrices are cast once, at build, into a copy the model owns; the CLIP passed in
    is untouched; LayerNorms and embeddings stay fp32 and shared; a forward pass converts no weight
    and runs without autocast."""
    from glocalclip.model.precision import COMPUTE_DTYPES, matrix_parameters

    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    model = GlocalCLIP(tiny_config(precision=precision), clip=tiny_clip)
    dtype = COMPUTE_DTYPES[precision]
    assert model.compute_dtype == dtype
    # the caller's CLIP: every tensor as it was, fp32
    for k, v in tiny_clip.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    cast = matrix_parameters(model.clip)
    assert len(cast) == 2 + 4 * (8 + 4) * 2 - 1  # conv1; per block in/out-proj, c_fc, c_proj (+ biases)
    assert all(p.dtype == dtype and not p.requires_grad for p in cast)
    cast_ids = {id(p) for p in cast}
    others = [(n, p) for n, p in model.clip.named_parameters() if id(p) not in cast_ids]
    assert all(p.dtype == torch.float32 for _, p in others)
    theirs = dict(tiny_clip.named_parameters())
    assert all(p.data_ptr() == theirs[n].data_ptr() for n, p in others)  # shared, not copied
    x = torch.randn(2, 3, TINY_SIZE, TINY_SIZE)
    autocast_seen = []
    hook = model.clip.visual.conv1.register_forward_pre_hook(
        lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    try:
        casts = _weight_casts(model, lambda: (model(x), model.encode_text()))
    finally:
        hook.remove()
    assert casts == [] and autocast_seen == [False]


def test_weight_casts_are_seen_when_they_happen(tiny_clip):
    """The watcher above does see a per-call weight cast (what autocast did)."""
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    x = torch.randn(1, 3, TINY_SIZE, TINY_SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        casts = _weight_casts(model, lambda: model(x))
    assert len(casts) > 10


def test_precision_is_fixed_when_the_model_is_built(tiny_clip):
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    model.cfg = model.cfg.replace(precision="bf16")
    with pytest.raises(RuntimeError, match="precision is fixed at build time"):
        model(torch.randn(1, 3, TINY_SIZE, TINY_SIZE))


@pytest.mark.parametrize("kernel", ["sdpa", "blocked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernels_match_softmax_attention(kernel, dtype):
    """Every kernel computes softmax(A Bᵀ·s)·V per (query, key) pair, stacked along the batch."""
    from glocalclip.model.attention import KERNELS

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 4, 37, 16, generator=g) for _ in range(3))
    got = KERNELS[kernel]([(q.to(dtype), k.to(dtype)), (v.to(dtype), v.to(dtype))], v.to(dtype)).float()
    want = torch.cat([torch.softmax(a @ b.transpose(-1, -2) / 4, dim=-1) @ v for a, b in ((q, k), (v, v))])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-6), ("bf16", 2e-2)])
def test_the_last_block_computes_the_class_row_as_the_full_block_does(tiny_clip, precision, atol):
    """The last dual-path block runs its standard stream for the class row alone (nothing reads the
    other rows). That row must be the full block's row 0: in fp32 to rounding, in bf16 (where the
    full block uses the blocked kernel and the class row SDPA) within bf16's rounding of the tokens;
    the V-V stream is the same tensor either way."""
    model = GlocalCLIP(tiny_config(precision=precision), clip=tiny_clip).eval()
    last = model.visual.dual_blocks[-1]
    g = torch.Generator().manual_seed(3)
    o, v = torch.randn(2, 50, 128, generator=g), torch.randn(2, 50, 128, generator=g)
    with torch.no_grad():
        o_full, v_full = last(o, v)
        o_cls, v_cls = last(o, v, class_row_only=True)
    assert o_full.shape == (2, 50, 128) and o_cls.shape == (2, 1, 128)
    torch.testing.assert_close(o_cls[:, 0], o_full[:, 0], atol=atol * o_full.abs().max().item(), rtol=0)
    torch.testing.assert_close(v_cls, v_full, atol=0, rtol=0)
    assert (o_cls[:, 0] - o_full[:, 1]).abs().max() > 10 * atol  # row 0, not any row
