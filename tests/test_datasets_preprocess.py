"""Image and mask preprocessing (docs/design.md §5): every PIL mode loads, values as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from glocalclip.datasets import IMAGE_MEAN, IMAGE_STD, DatasetError, load_image, load_mask

S = 24
MEAN = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGE_STD).view(3, 1, 1)


def reference(img: Image.Image) -> torch.Tensor:
    """The original pipeline written out: bicubic resize in the native mode, RGB, ToTensor, normalise."""
    rgb = img.resize((S, S), Image.BICUBIC).convert("RGB")
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - MEAN) / STD


def grey_tensor(value_0_255: float) -> torch.Tensor:
    return (torch.full((3, S, S), value_0_255 / 255.0) - MEAN) / STD


def test_openai_constants():
    assert IMAGE_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert IMAGE_STD == (0.26862954, 0.26130258, 0.27577711)


def _eight_bit(mode: str) -> Image.Image:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (10, 13, 3), dtype=np.uint8))
    if mode == "P":
        return rgb.quantize(16)
    if mode == "RGBA":
        a = Image.fromarray(rng.integers(0, 256, (10, 13), dtype=np.uint8))
        out = rgb.copy()
        out.putalpha(a)
        return out
    return rgb.convert(mode)


@pytest.mark.parametrize("mode,ext", [("1", ".png"), ("L", ".png"), ("P", ".png"), ("LA", ".png"),
                                      ("RGB", ".jpg"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("RGB", ".bmp"),
                                      ("L", ".tif")])
def test_eight_bit_modes_follow_the_original_order(tmp_path, mode, ext):
    img = _eight_bit(mode)
    path = tmp_path / f"img{ext}"
    img.save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode
        expected = reference(reread)  # resize in the native mode (nearest for "1"/"P"), then RGB
    for source in (str(path), path, Image.open(path)):
        x = load_image(source, S)
        assert x.shape == (3, S, S) and x.dtype == torch.float32
        assert torch.equal(x, expected)


def test_resize_happens_before_rgb_conversion():
    # a palette image: nearest resize in "P" differs from bicubic after conversion; the original order wins
    img = _eight_bit("P")
    after = (torch.from_numpy(np.asarray(img.convert("RGB").resize((S, S), Image.BICUBIC), dtype=np.float32)
                              / 255.0).permute(2, 0, 1) - MEAN) / STD
    x = load_image(img, S)
    assert torch.equal(x, reference(img)) and not torch.equal(x, after)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_sixteen_bit_scaled_by_type_range(tmp_path, mode):
    arr = np.full((9, 11), 65535, dtype=np.uint16)
    arr[:, :5] = 0
    img = Image.frombytes(mode, (11, 9), arr.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert img.mode == mode
    x = load_image(img, S)
    assert torch.allclose(x[:, :, 0], grey_tensor(0)[:, :, 0]) and torch.allclose(x[:, :, -1], grey_tensor(255)[:, :, -1])
    const = Image.fromarray(np.full((9, 11), 32768, dtype=np.uint16))
    assert torch.allclose(load_image(const, S), grey_tensor(128))  # 32768/65535*255 = 127.5 -> 128
    if mode == "I;16":
        path = tmp_path / "sixteen.png"
        const.save(path)
        with Image.open(path) as reread:
            assert reread.mode in ("I;16", "I")
        assert torch.allclose(load_image(str(path), S), grey_tensor(128))


def test_int32_scaled_by_range():
    small = Image.fromarray(np.full((6, 6), 65535, dtype=np.int32))
    assert small.mode == "I"
    assert torch.allclose(load_image(small, S), grey_tensor(255))
    big = np.full((6, 6), 2 ** 31 - 1, dtype=np.int32)
    big[0, 0] = 70000
    x = load_image(Image.fromarray(big), S)
    assert torch.allclose(x[:, -1, -1], grey_tensor(255)[:, 0, 0])
    neg = Image.fromarray(np.full((6, 6), -5, dtype=np.int32))
    assert torch.allclose(load_image(neg, S), grey_tensor(0))


def test_float_scaled_by_range(tmp_path):
    unit = Image.fromarray(np.full((6, 6), 0.5, dtype=np.float32))
    assert unit.mode == "F"
    assert torch.allclose(load_image(unit, S), grey_tensor(128))  # 0.5 * 255 = 127.5 -> 128
    arr = np.zeros((6, 8), dtype=np.float32)
    arr[:, 4:] = 10.0  # max > 1: min-max scaled
    x = load_image(Image.fromarray(arr), S)
    assert torch.allclose(x[:, 0, 0], grey_tensor(0)[:, 0, 0]) and torch.allclose(x[:, 0, -1], grey_tensor(255)[:, 0, 0])
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((6, 6), 1.0, dtype=np.float32)).save(path)
    assert torch.allclose(load_image(str(path), S), grey_tensor(255))


def test_ndarray_input():
    rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    assert torch.equal(load_image(rgb, S), reference(Image.fromarray(rgb)))
    assert torch.allclose(load_image(rgb.astype(np.float32) / 255.0, S), load_image(rgb, S), atol=1e-6)
    grey = rgb[:, :, 0]
    assert torch.equal(load_image(grey, S), reference(Image.fromarray(grey)))
    with pytest.raises(DatasetError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8), S)


def test_undecodable_and_missing_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DatasetError, match="cannot decode image .*bad.png"):
        load_image(str(bad), S)
    with pytest.raises(DatasetError, match="image file .*missing.png does not exist"):
        load_image(str(tmp_path / "missing.png"), S)
    with pytest.raises(DatasetError, match="mask file .*missing.png does not exist"):
        load_mask(str(tmp_path / "missing.png"), S)


# ---------------------------------------------------------------- masks


def reference_mask(img: Image.Image, size: int) -> torch.Tensor:
    binary = (np.asarray(img.convert("L")) > 0).astype(np.uint8) * 255
    soft = np.asarray(Image.fromarray(binary).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy((soft > 0.5).astype(np.float32))


def test_mask_threshold_after_bilinear_resize(tmp_path):
    arr = np.zeros((10, 10), dtype=np.uint8)
    arr[2:7, 3:6] = 1  # any value > 0 is foreground
    arr[8, 8] = 200  # a single pixel: bilinear upscaling + > 0.5 keeps only its centre
    path = tmp_path / "m.png"
    Image.fromarray(arr).save(path)
    m = load_mask(str(path), 37)
    assert m.shape == (37, 37) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m, reference_mask(Image.fromarray(arr), 37))
    # bilinear at this scale softens the edge: the thresholded area is close to, not exactly, the scaled box
    assert abs(m.sum().item() - 15 * 3.7 ** 2 - 3.7 ** 2) < 60


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "I;16", "I", "F"])
def test_mask_modes(mode):
    arr = np.zeros((12, 12), dtype=np.uint8)
    arr[3:9, 3:9] = 255
    base = Image.fromarray(arr)
    if mode in ("I;16",):
        img = Image.fromarray(arr.astype(np.uint16) * 257)
    elif mode == "I":
        img = Image.fromarray(arr.astype(np.int32))
    elif mode == "F":
        img = Image.fromarray(arr.astype(np.float32) / 255.0)
    elif mode == "P":
        img = base.convert("RGB").quantize(2)
    else:
        img = base.convert(mode)
    assert img.mode == mode
    m = load_mask(img, S)
    assert torch.equal(m, reference_mask(base, S))
    assert m.sum() > 0


def test_uint8_items_normalised_on_the_device_equal_the_float_items(tmp_path):
    """Loader workers hand over uint8 images; normalising them afterwards is bit-identical to
    ToTensor + Normalize done in the worker (the numpy float32 path written out here)."""
    import numpy as np
    import torch
    from PIL import Image

    from glocalclip.datasets import IMAGE_MEAN, IMAGE_STD, load_image, normalize_image
    from glocalclip.datasets.preprocess import image_to_uint8

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    u8 = image_to_uint8(img, 40)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 40, 40)
    arr = np.asarray(img.resize((40, 40), Image.BICUBIC).convert("RGB"), dtype=np.float32) / 255.0
    ref = (torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(IMAGE_MEAN).view(3, 1, 1)) / \
        torch.tensor(IMAGE_STD).view(3, 1, 1)
    assert torch.equal(normalize_image(u8), ref)
    assert torch.equal(normalize_image(u8[None])[0], ref)  # batched
    assert torch.equal(load_image(img, 40), ref)
