"""Layers as data (docs/design.md §2.4): the encoder's distinct layer tensors and their counts, and
the anomaly map, local loss, feature cache and image score computed from them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glocalclip import GlocalCLIP
from glocalclip.engine.feature_cache import FeatureCache
from glocalclip.model.layers import LayerFeatures
from glocalclip.model.losses import dice_loss, focal_loss
from glocalclip.model.scoring import final_image_score, patch_probabilities
from glocalclip.model.vision import DualPathVisionEncoder

from conftest import TINY_SIZE, tiny_config


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(seed))


def _masks(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, TINY_SIZE, TINY_SIZE, generator=g) > 0.8).float()


def _model(tiny_clip, **changes) -> GlocalCLIP:
    torch.manual_seed(0)
    return GlocalCLIP(tiny_config(**changes), clip=tiny_clip)


def _hand_map(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One layer's upsampled class probabilities [B, 2, H, W], computed on its own."""
    return F.interpolate(patch_probabilities(tokens, text, 0.07), size=(TINY_SIZE, TINY_SIZE),
                         mode="bilinear", align_corners=False)


def _term(m: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return focal_loss(m, masks) + dice_loss(m[:, 1], masks) + dice_loss(m[:, 0], 1 - masks)


@pytest.mark.parametrize("features, multilayer, n_distinct, counts", [
    ((2, 4, 6, 8), "reference", 2, (1, 3)),      # block 2, then v after block 8 for layers 4, 6, 8
    ((2, 4, 6, 8), "snapshot", 4, (1, 1, 1, 1)),
    ((2, 3, 4, 8), "reference", 2, (1, 3)),      # block 3 (last standard block) is aliased too
    ((1, 2), "reference", 2, (1, 1)),            # nothing from the surgery on: no sharing
    ((5, 8), "reference", 1, (2,)),
    ((4, 5, 6, 8), "reference", 1, (4,)),        # the default's shape ((6, 12, 18, 24), dpam 20 of 24)
    ((4, 5, 6, 8), "snapshot", 4, (1, 1, 1, 1)),
])
def test_encoder_layer_data_has_the_expected_distinct_tensors_and_counts(
        tiny_clip, features, multilayer, n_distinct, counts):
    model = _model(tiny_clip, features_list=features, multilayer=multilayer)
    assert model.visual.first_dual == 4  # dpam 6 on the 8-block tiny tower
    img, layers = model.encode_image_layers(_images())
    assert len(layers.tensors) == n_distinct and layers.counts == counts
    assert len(layers) == len(features)
    assert all(t.shape == (2, 65, img.shape[1]) and t.dtype == torch.float32 for t in layers.tensors)
    for i in range(n_distinct - 1):
        assert not torch.allclose(layers.tensors[i], layers.tensors[i + 1], atol=1e-3)
    g2, per_layer = model.encode_image(_images())  # the public list: one entry per selected layer
    assert torch.equal(g2, img) and len(per_layer) == len(features)
    for a, b in zip(per_layer, layers.per_layer()):
        assert torch.equal(a, b)


def test_reference_distinct_layers_are_block_two_and_the_last_vv_stream(tiny_clip):
    x = _images()
    _, ref = _model(tiny_clip).encode_image_layers(x)
    _, snap = _model(tiny_clip, multilayer="snapshot").encode_image_layers(x)
    assert torch.equal(ref.tensors[0], snap.tensors[0])  # block 2: a standard block, both modes
    torch.testing.assert_close(ref.tensors[1], snap.tensors[-1], rtol=1e-6, atol=1e-6)  # v after block 8


@pytest.mark.parametrize("multilayer", ["reference", "snapshot"])
def test_anomaly_map_is_the_explicit_per_layer_sum_bit_for_bit(tiny_clip, multilayer):
    model = _model(tiny_clip, multilayer=multilayer)
    x = _images(3)
    with torch.no_grad():
        _, per_layer = model.encode_image(x)
        _, l_text = model.encode_text()
        out = model(x)
    singles = [(m[:, 1] + 1 - m[:, 0]) / 2 for m in (_hand_map(t, l_text) for t in per_layer)]
    total = singles[0]
    for s in singles[1:]:  # every selected layer on its own, summed in layer order
        total = total + s
    assert torch.equal(out["anomaly_map"], total)
    if multilayer == "reference":  # the order of operations shows: count·map would round otherwise
        assert not torch.equal(out["anomaly_map"], singles[0] + 3 * singles[1])


@pytest.mark.parametrize("multilayer", ["reference", "snapshot"])
def test_local_loss_is_the_explicit_weighted_sum_bit_for_bit(tiny_clip, multilayer):
    model = _model(tiny_clip, multilayer=multilayer)
    x = _images(2)
    img, layers = model.encode_image_layers(x)
    with torch.no_grad():
        text = model.encode_text()
    maps = [_hand_map(t, text[1]) for t in layers.per_layer()]
    rounding_shows = False
    for seed in range(8):  # several masks: adding a term k times rounds unlike k·term for some
        masks = _masks(2, seed)
        with torch.no_grad():
            got = model.losses_from_features(img, layers, masks, torch.tensor([0, 1]), text=text)
        terms = [_term(m, masks) for m in maps]
        if multilayer == "reference":  # the V-V map of layers 4, 6, 8: its term once, times three
            want = torch.zeros(()) + terms[0] + 3 * terms[1]
            rounding_shows |= not torch.equal(want, torch.zeros(()) + terms[0] + terms[1] + terms[2] + terms[3])
        else:
            want = torch.zeros(())
            for t in terms:
                want = want + t
            rounding_shows = True
        assert torch.equal(got["local"], want), seed
    assert rounding_shows


def test_copies_of_the_layer_data_give_the_same_losses(tiny_clip):
    """The counts travel with the data: copying every tensor (as .to()/.float() may) changes nothing."""
    model = _model(tiny_clip)
    img, layers = model.encode_image_layers(_images())
    masks, labels = _masks(), torch.tensor([0, 1])
    copied = layers.map(torch.clone)
    assert copied.counts == (1, 3) and copied.tensors[1] is not layers.tensors[1]
    with torch.no_grad():
        a = model.losses_from_features(img, layers, masks, labels)
        b = model.losses_from_features(img, copied, masks, labels)
        valid = torch.tensor([False, True])
        c = model.losses_from_features(img, layers, masks, labels, mask_valid=valid)
        d = model.losses_from_features(img[1:], LayerFeatures((layers.tensors[0][1:], layers.tensors[1][1:]), (1, 3)),
                                       masks[1:], labels[1:])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(c["local"], d["local"])  # rows dropped per distinct tensor, counts kept


def test_feature_cache_stores_distinct_layers_and_gives_back_their_counts(tiny_clip):
    model = _model(tiny_clip)
    img, layers = model.encode_image_layers(_images(3))
    tokens, width = layers.tensors[0].shape[1:]
    cache = FeatureCache(5, img.shape[1], tokens, width, layers.counts, TINY_SIZE, "host", torch.device("cpu"))
    assert len(cache.patches) == 2  # not one store per selected layer
    masks = _masks(3)
    cache.put(torch.tensor([4, 0, 2]), img, layers, masks, torch.tensor([1, 0, 1]), torch.ones(3, dtype=torch.bool))
    g, got, m, y, valid = cache.get(torch.tensor([0, 2, 4]))
    order = torch.tensor([1, 2, 0])
    assert isinstance(got, LayerFeatures) and got.counts == (1, 3)
    for a, b in zip(got.tensors, layers.tensors):
        assert torch.equal(a, b[order])
    assert torch.equal(g, img[order]) and torch.equal(m, masks[order]) and y.tolist() == [0, 1, 1]
    snapshot = LayerFeatures((layers.tensors[0],) * 4, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="layer counts"):
        cache.put(torch.tensor([1]), img[:1], snapshot, masks[:1], torch.tensor([0]), torch.ones(1, dtype=torch.bool))


def test_layer_features_validates_and_expands_in_order():
    a, b = torch.zeros(1), torch.ones(1)
    layers = LayerFeatures([a, b], [2, 1])
    assert layers.tensors == (a, b) and layers.counts == (2, 1)
    assert [t is a for t in layers] == [True, True, False] and len(layers) == 3 and layers[2] is b
    calls = []
    doubled = layers.map(lambda t: calls.append(t) or 2 * t)
    assert len(calls) == 2 and doubled.counts == (2, 1) and doubled[2].item() == 2.0
    plain = LayerFeatures.of([a, a])
    assert plain.counts == (1, 1) and LayerFeatures.of(layers) is layers
    with pytest.raises(ValueError, match="counts"):
        LayerFeatures((a, b), (1,))
    with pytest.raises(ValueError, match="at least once"):
        LayerFeatures((a,), (0,))


def test_final_image_score_is_the_one_fusion(tiny_clip):
    prob = torch.tensor([0.2, 0.9])
    amap = torch.tensor([[[0.1, 0.7]], [[0.3, 0.2]]])
    assert torch.equal(final_image_score(prob, amap, "global"), prob)
    torch.testing.assert_close(final_image_score(prob, amap, "global+max"), torch.tensor([0.9, 1.2]))
    with pytest.raises(ValueError, match="image_score mode"):
        final_image_score(prob, amap, "max")
    model = _model(tiny_clip, image_score="global+max")
    with torch.no_grad():
        out = model(_images())
    assert torch.equal(out["image_score"], final_image_score(out["global_score"], out["anomaly_map"], "global+max"))


def test_encoder_refuses_unsorted_layers(tiny_clip):
    with pytest.raises(ValueError, match="increasing"):
        DualPathVisionEncoder(tiny_clip.visual, (6, 2), 6)
