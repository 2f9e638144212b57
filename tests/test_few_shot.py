"""The few-shot term (docs/design.md §11): the nearest-neighbour map against a plain numpy search, a
shot scored against itself, the blocked search against the whole matmul, the bank's file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from glocalclip import GlocalCLIP
from glocalclip.model.config import FewShotSettings
from glocalclip.model.few_shot import ReferenceBank, bank_from_features, few_shot_map, join_scores, nearest_distances
from glocalclip.model.layers import LayerFeatures


def _numpy_nearest(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Plain nearest neighbour: for every query row, min over bank rows of (1 - cos)/2, in float64."""
    q = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    b = bank / np.linalg.norm(bank, axis=-1, keepdims=True)
    out = np.empty(len(q))
    for i, row in enumerate(q):
        out[i] = min((1 - float(row @ r)) / 2 for r in b)
    return out


def _features(rng, b, side, e):
    return torch.from_numpy(rng.normal(size=(b, 1 + side * side, e)).astype(np.float32))


def test_map_equals_a_numpy_nearest_neighbour_per_layer_then_the_count_weighted_mean():
    rng = np.random.default_rng(0)
    side, e, size = 3, 5, 12
    shots = LayerFeatures((_features(rng, 2, side, e), _features(rng, 2, side, e)), (1, 3))
    tests = LayerFeatures((_features(rng, 4, side, e), _features(rng, 4, side, e)), (1, 3))
    bank = bank_from_features(shots)
    assert [tuple(t.shape) for t in bank.tensors] == [(2 * side * side, e)] * 2  # class rows dropped
    got = few_shot_map(tests, bank, size)
    assert got.shape == (4, size, size)
    want = 0
    for (t, k), s in zip(tests.weighted(), shots.tensors):
        d = _numpy_nearest(t[:, 1:].reshape(-1, e).numpy().astype(np.float64),
                           s[:, 1:].reshape(-1, e).numpy().astype(np.float64))
        grid = torch.from_numpy(d.reshape(4, 1, side, side)).float()
        want = want + k * F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    want = want / 4
    assert float(got.min()) >= 0 and float(got.max()) > 0.05
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_block", [1, 7, 50, 10 ** 9])
def test_blocked_search_equals_the_whole_matmul(max_block):
    rng = np.random.default_rng(1)
    q = F.normalize(torch.from_numpy(rng.normal(size=(3, 16, 8)).astype(np.float32)), dim=-1)
    bank = F.normalize(torch.from_numpy(rng.normal(size=(37, 8)).astype(np.float32)), dim=-1)
    whole = ((1 - (q.reshape(-1, 8) @ bank.t()).amax(dim=1)) / 2).reshape(3, 16)
    # a row block is its own matmul, rounded in its own order: equal to float32 rounding
    torch.testing.assert_close(nearest_distances(q, bank, max_block=max_block), whole, atol=2e-7, rtol=0)


def test_an_empty_bank_is_refused():
    with pytest.raises(ValueError, match="empty"):
        nearest_distances(torch.ones(1, 4, 3), torch.zeros(0, 3))


def test_join_adds_the_weighted_map_and_its_max_or_mean():
    out = {"image_score": torch.tensor([0.2, 0.4]), "anomaly_map": torch.ones(2, 2, 2),
           "global_score": torch.tensor([0.2, 0.4])}
    fs = torch.tensor([[[0.0, 0.1], [0.2, 0.3]], [[0.0, 0.0], [0.0, 0.4]]])
    j = join_scores(out, fs, FewShotSettings(weight=2.0, image_term="max"))
    torch.testing.assert_close(j["anomaly_map"], 1 + 2 * fs)
    torch.testing.assert_close(j["image_score"], torch.tensor([0.8, 1.2]))
    torch.testing.assert_close(j["global_score"], torch.tensor([0.8, 1.2]))
    m = join_scores(out, fs, FewShotSettings(weight=1.0, image_term="mean"))
    torch.testing.assert_close(m["image_score"], torch.tensor([0.35, 0.5]))


@pytest.mark.parametrize("layers", ["selected", "blocks"])
def test_an_image_identical_to_a_shot_gets_a_zero_few_shot_map(tiny_clip, layers):
    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    g = torch.Generator().manual_seed(3)
    shots = torch.randn(3, 3, 112, 112, generator=g)
    other = torch.randn(1, 3, 112, 112, generator=g)
    bank = model.reference_bank(shots, FewShotSettings(layers=layers), batch_size=2)
    assert bank.n_rows == 3 * 8 * 8
    same = model(shots[1:2], reference=bank)
    assert float(same["few_shot_map"].abs().max()) < 1e-5
    diff = model(other, reference=bank)
    assert float(diff["few_shot_map"].min()) > 1e-3  # a new image is nowhere at distance zero
    plain = model(shots[1:2])
    torch.testing.assert_close(same["anomaly_map"], plain["anomaly_map"], atol=1e-5, rtol=0)


def test_blocks_are_the_snapshot_layers(tiny_clip):
    """``blocks`` reads each selected block's own features: under multilayer=snapshot they are the
    selected layers themselves; under reference the aliased layers become distinct blocks."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(4))
    snap = GlocalCLIP(tiny_config(multilayer="snapshot"), clip=tiny_clip)
    _, layers, blocks = snap.encode_image_blocks(x)
    for a, b in zip(layers.per_layer(), blocks.per_layer()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    ref = GlocalCLIP(tiny_config(), clip=tiny_clip)
    _, ref_layers, ref_blocks = ref.encode_image_blocks(x)
    assert ref_layers.counts == (1, 3) and ref_blocks.counts == (1, 1, 1, 1)
    for a, b in zip(blocks.per_layer(), ref_blocks.per_layer()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_bank_file_round_trips_with_weights_only_and_refuses_another_model(tiny_clip, tmp_path):
    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    shots = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    bank = model.reference_bank(shots, FewShotSettings(weight=3.0), sources=["a.png", "b.png"])
    bank.save(tmp_path / "bank.pt")
    back = ReferenceBank.load(tmp_path / "bank.pt")
    assert back.settings == FewShotSettings(weight=3.0) and back.sources == ("a.png", "b.png")
    assert back.layers.counts == bank.layers.counts
    for a, b in zip(back.layers.tensors, bank.layers.tensors):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    back.check_fits(model.cfg)
    with pytest.raises(ValueError, match="image_size: bank 112 vs model 56"):
        back.check_fits(tiny_config(image_size=56))
    torch.save({"format": "x"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a reference bank"):
        ReferenceBank.load(tmp_path / "other.pt")
    # a pickle that would run code is refused by weights_only, with the same message
    torch.save({"format": object()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a reference bank"):
        ReferenceBank.load(tmp_path / "evil.pt")


def test_a_bank_is_saved_only_under_a_bank_name_and_replaces_a_file_only_when_asked(tiny_clip, tmp_path):
    from glocalclip.engine.few_shot import load_reference
    from glocalclip.files import OutputError

    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    shots = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    bank = model.reference_bank(shots, FewShotSettings(weight=3.0))
    for name in ("bank.npz", "bank", "bank.pt.txt"):  # --reference would read these as images
        with pytest.raises(ValueError, match=f"cannot save a reference bank as .*{name}: its name must end in "
                                             r"\.pt, \.pth, \.bank"):
            bank.save(tmp_path / name)
    assert sorted(tmp_path.iterdir()) == []
    bank.save(tmp_path / "Good.BANK")  # any case, as --reference reads it
    assert load_reference(model, str(tmp_path / "Good.BANK")).settings == FewShotSettings(weight=3.0)
    other = model.reference_bank(shots[:1], FewShotSettings(weight=5.0))
    before = (tmp_path / "Good.BANK").read_bytes()
    with pytest.raises(OutputError, match="exists and is kept"):
        other.save(tmp_path / "Good.BANK")
    assert (tmp_path / "Good.BANK").read_bytes() == before
    other.save(tmp_path / "Good.BANK", overwrite=True)
    assert ReferenceBank.load(tmp_path / "Good.BANK").settings == FewShotSettings(weight=5.0)
    assert [p.name for p in tmp_path.iterdir()] == ["Good.BANK"]  # no temp file left


@pytest.mark.parametrize("route", ["predictor", "export"])
def test_the_public_api_refuses_a_bank_name_before_it_loads_anything(tiny_checkpoint, tmp_path, monkeypatch, route):
    """``Predictor.from_checkpoint`` and ``export_onnx`` check ``save_reference`` first: a bad name or
    a file to keep is refused before the checkpoint loads and minutes of bank building start."""
    from glocalclip import Predictor
    from glocalclip.deploy import export as export_module
    from glocalclip.files import OutputError
    from glocalclip.inference import predictor as predictor_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the bank's name was checked")

    monkeypatch.setattr(predictor_module, "load_model_and_checkpoint", no_loading)
    monkeypatch.setattr(export_module, "load_model_and_checkpoint", no_loading)
    (tmp_path / "old.pt").write_bytes(b"kept")
    build = (lambda **kw: Predictor.from_checkpoint(tiny_checkpoint, device="cpu", reference=str(tmp_path), **kw)) \
        if route == "predictor" else \
        (lambda **kw: export_module.export_onnx(tiny_checkpoint, tmp_path / "m.onnx", reference=str(tmp_path), **kw))
    with pytest.raises(ValueError, match="its name must end in"):
        build(save_reference=str(tmp_path / "bank.npz"))
    with pytest.raises(OutputError, match="old.pt: a file of that name exists and is kept"):
        build(save_reference=str(tmp_path / "old.pt"))
    with pytest.raises(AssertionError, match="loaded before"):  # asked to replace: on to loading
        build(save_reference=str(tmp_path / "old.pt"), overwrite_reference=True)
    assert (tmp_path / "old.pt").read_bytes() == b"kept"


# ---------------------------------------------------------------------------- --reference DIR|GLOB|BANK
def _write_pngs(folder, n, seed, size=(70, 90)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"ref{i}.png")
    return sorted(folder.glob("*.png"))


def test_reference_from_a_folder_a_glob_and_a_saved_bank_is_one_bank(tiny_clip, tmp_path):
    from glocalclip.datasets import normalize_image
    from glocalclip.engine.few_shot import load_reference, reference_pixels

    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    files = _write_pngs(tmp_path / "good" / "sub", 3, seed=1)
    (tmp_path / "good" / "notes.txt").write_text("not an image")
    from_dir = load_reference(model, str(tmp_path / "good"))
    from_glob = load_reference(model, str(tmp_path / "good" / "**" / "*.png"))
    direct = model.reference_bank(normalize_image(reference_pixels(files, 112)))
    assert from_dir.sources == tuple(str(f.resolve()) for f in files) and from_dir.settings == FewShotSettings()
    for a, b, c in zip(from_dir.layers.tensors, from_glob.layers.tensors, direct.layers.tensors):
        torch.testing.assert_close(a, c, atol=0, rtol=0)
        torch.testing.assert_close(b, c, atol=0, rtol=0)
    from_dir.save(tmp_path / "bank.pt")
    again = load_reference(model, str(tmp_path / "bank.pt"))
    for a, b in zip(again.layers.tensors, from_dir.layers.tensors):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="saved bank built with"):
        load_reference(model, str(tmp_path / "bank.pt"), FewShotSettings(weight=2.0))


def test_a_saved_bank_takes_the_few_shot_fields_given_and_refuses_one_that_differs_by_name(tiny_clip, tmp_path):
    from glocalclip.apps.cli import SETTINGS_WITH_FLAGS
    from glocalclip.apps.flags import for_command_line
    from glocalclip.engine.few_shot import load_reference
    from glocalclip.settings import SettingError

    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    _write_pngs(tmp_path / "good", 2, seed=3)
    saved = FewShotSettings(weight=4.0, layers="selected", image_term="mean")  # no field at its default
    built = load_reference(model, str(tmp_path / "good"), {"weight": 4.0, "layers": "selected", "image_term": "mean"})
    assert built.settings == saved and built.model_key["multilayer"] == model.cfg.multilayer
    built.save(tmp_path / "bank.pt")
    # the fields given that agree are taken; the bank's own fill the rest (not the defaults)
    for given in ({"weight": 4.0}, {"image_term": "mean"}, {"layers": "selected", "weight": 4.0}, {}, None, saved):
        back = load_reference(model, str(tmp_path / "bank.pt"), given)
        assert back.settings == saved and back.n_rows == built.n_rows
    # a field given that differs is refused, by its name in Python and by its flag on a command line
    with pytest.raises(SettingError) as refused:
        load_reference(model, str(tmp_path / "bank.pt"), {"weight": 4.0, "layers": "blocks"})
    assert refused.value.fields == ("layers",)
    assert for_command_line(refused.value, *SETTINGS_WITH_FLAGS) == (
        f"--reference {tmp_path / 'bank.pt'} is a saved bank built with --shot_layers selected (not blocks): leave "
        "--shot_layers out to score with the bank's, or build the bank again from the images")
    with pytest.raises(SettingError) as refused:
        load_reference(model, str(tmp_path / "bank.pt"), {"weight": 2.0, "image_term": "max"})
    assert refused.value.fields == ("weight", "image_term")
    assert "built with weight 4.0 (not 2.0), image_term mean (not max): leave weight image_term out" in \
        str(refused.value)
    with pytest.raises(SettingError, match="layers"):  # all of a FewShotSettings count as given
        load_reference(model, str(tmp_path / "bank.pt"), FewShotSettings(weight=4.0, image_term="mean"))
    with pytest.raises(TypeError, match="shot_weight"):  # a field that does not exist is no silent no-op
        load_reference(model, str(tmp_path / "bank.pt"), {"shot_weight": 4.0})


def test_reference_without_images_or_with_a_broken_one_is_refused_by_name(tiny_clip, tmp_path):
    from glocalclip.datasets import DatasetError
    from glocalclip.engine.few_shot import load_reference

    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        load_reference(model, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_reference(model, str(tmp_path / "missing"))
    _write_pngs(tmp_path / "mixed", 1, seed=2)
    (tmp_path / "mixed" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png.*remove it from --reference"):
        load_reference(model, str(tmp_path / "mixed"))


def test_bank_buffers_move_with_the_module_and_give_the_bank_back(tiny_clip):
    from glocalclip.model.few_shot import BankBuffers

    torch.manual_seed(0)
    model = GlocalCLIP(tiny_config(), clip=tiny_clip)
    bank = model.reference_bank(torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(6)),
                                sources=["/x/a.png", "/x/b.png"])
    held = BankBuffers(bank)
    assert sorted(held.state_dict()) == [f"layer{i}" for i in range(len(bank.layers.tensors))]
    held = held.to(torch.float64)
    back = held.bank()
    assert back.layers.counts == bank.layers.counts and back.settings == bank.settings
    assert all(t.dtype == torch.float64 for t in back.layers.tensors)
    torch.testing.assert_close(back.layers.tensors[0].float(), bank.layers.tensors[0], atol=0, rtol=0)
    assert held.describe() == {"settings": bank.settings.to_dict(), "images": 2, "sources": ["a.png", "b.png"],
                               "rows": 2 * 64}
