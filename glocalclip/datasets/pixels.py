"""Decoding and resizing images with PIL and numpy alone, so that the torch-free ONNX runtime
(``glocalclip.deploy``) feeds its model exactly the pixels that training, testing and ``predict`` do.

The rules (bicubic resize in the image's own mode, high-depth grey scaled to 8 bits, arrays read in
their dtype's range) are described in ``preprocess.py``, which turns these pixels into tensors.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .errors import DatasetError

_HIGH_DEPTH_MODES = ("I", "F")  # plus every "I;16..." mode


def is_high_depth(mode: str) -> bool:
    """Whether a PIL mode holds more than 8 bits a value (16/32-bit integers, floats): read by its range."""
    return mode in _HIGH_DEPTH_MODES or mode.startswith("I;")


#: the end of the advice on a missing or undecodable file of a dataset (predict passes its own)
DATASET_FIX = "or remove it and regenerate meta.json (python generate_dataset_json/<name>.py --root ROOT)"
EXIF_ORIENTATION = 0x0112


def open_image(path, what: str = "image", fix: str = DATASET_FIX) -> Image.Image:
    """Open an image file lazily (header only), with a DatasetError naming the file on failure;
    ``fix`` ends the advice ("restore it / replace it ... <fix>")."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"{what} file {path} does not exist; restore it {fix}")
    try:
        return Image.open(path)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DatasetError(f"cannot decode {what} {path} ({exc}); replace it with a valid image "
                           f"(PNG/JPEG/BMP/TIFF) {fix}") from None


def decoded(img: Image.Image, what: str, fix: str = DATASET_FIX) -> Image.Image:
    try:
        img.load()
    except Exception as exc:
        name = getattr(img, "filename", "") or "<in-memory image>"
        raise DatasetError(f"cannot decode {what} {name} ({exc}); the file is truncated or corrupt: replace it "
                           f"{fix}") from None
    return img


def exif_upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says, i.e. as viewers show it (a phone photo taken
    upright is stored sideways with orientation 6). Used for folder-mode data and predict; named
    datasets are read as stored, as the original code read them (docs/design.md §5). An image
    without the tag (or with an unreadable one) comes back as it is."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still good
        return img
    if orientation not in range(2, 9):
        return img
    from PIL import ImageOps

    turned = ImageOps.exif_transpose(decoded(img, "image"))
    turned.filename = getattr(img, "filename", "")  # later messages still name the file
    return turned


def to_8bit_grey(img: Image.Image) -> Image.Image:
    """Scale an "I;16*", "I" or "F" image to "L" by its type's range (see the module docstring)."""
    mode = img.mode
    arr = np.asarray(img)
    if mode.startswith("I;"):
        scaled = arr.astype(np.float64) / 65535.0 * 255.0
    elif mode == "I":
        a = arr.astype(np.float64)
        top = 65535.0 if a.size == 0 or a.max() <= 65535 else float(2 ** 31 - 1)
        scaled = np.clip(a, 0, None) / top * 255.0
    elif mode == "F":
        a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size == 0 or a.max() <= 1.0:
            scaled = np.clip(a, 0, None) * 255.0
        else:
            lo, hi = a.min(), a.max()
            scaled = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    else:
        raise ValueError(f"not a high-depth mode: {mode}")
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def image_from_array(arr: np.ndarray) -> Image.Image:
    """An RGB/RGBA/grey ndarray (H,W[,C]) -> PIL image in the matching mode."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise DatasetError(f"an image array must be H x W, H x W x 3 (RGB) or H x W x 4 (RGBA), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        if arr.dtype == np.uint8:
            return Image.fromarray(arr)  # "L"
        if arr.dtype == np.uint16:
            return Image.fromarray(arr)  # "I;16"
        if np.issubdtype(arr.dtype, np.integer):
            return Image.fromarray(arr.astype(np.int32))  # "I"
        return Image.fromarray(arr.astype(np.float32))  # "F"
    if arr.dtype != np.uint8:
        a = np.nan_to_num(arr.astype(np.float64))
        if np.issubdtype(arr.dtype, np.floating) and a.max(initial=0) <= 1.0:
            a = a * 255.0
        elif arr.dtype == np.uint16:
            a = a / 65535.0 * 255.0
        arr = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)  # "RGB" or "RGBA"



def eight_bit(img: Image.Image) -> Image.Image:
    """High-depth grey ("I;16", "I", "F") scaled to 8-bit grey by its type's range; other modes as they are."""
    return to_8bit_grey(img) if is_high_depth(img.mode) else img


def rgb_pixels(img: Image.Image) -> np.ndarray:
    """uint8 RGB [h, w, 3] at the image's own size, grey levels scaled as the model's input is (for
    pictures drawn over the image)."""
    return np.asarray(eight_bit(img).convert("RGB"))


def resized_rgb(img: Image.Image, image_size: int) -> np.ndarray:
    """The image the model sees, as uint8 [S, S, 3]: high-depth grey scaled to 8 bits, then PIL
    bicubic resize to S x S in the image's own mode (aspect ignored), then convert("RGB")."""
    img = eight_bit(img)
    try:
        img = img.resize((image_size, image_size), Image.BICUBIC).convert("RGB")
    except (ValueError, OSError) as exc:
        name = getattr(img, "filename", "") or "<in-memory image>"
        raise DatasetError(f"image {name} has PIL mode {img.mode!r}, which cannot be resized or converted to RGB "
                           f"({exc}); re-save it as an 8-bit RGB or grey PNG") from None
    return np.array(img, dtype=np.uint8)


# ---------------------------------------------------------------------------- reduced while decoding (serve)
#: an image is reduced while decoding only to an integer fraction that keeps each side at least this many
#: times the model's input side, so the bicubic resize after it still averages several pixels per output
#: pixel (Pillow's ``reducing_gap`` idea); images smaller than that are decoded exactly as predict does
REDUCING_GAP = 3
_NOT_REDUCIBLE = ("1", "P", "PA")  # palette indices and bits cannot be averaged
_ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                          6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                          8: Image.Transpose.ROTATE_90}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored; 1 also where it is missing or unreadable)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still good
        return 1
    return orientation if orientation in _ORIENTATION_TRANSPOSE else 1


def _reduction(size: tuple[int, int], image_size: int, keep_long_side: int) -> tuple[int, int]:
    """Per axis, the largest integer factor that keeps the side >= REDUCING_GAP x ``image_size``, and
    the long side >= ``keep_long_side`` (the picture drawn from it, aspect kept), at least 1."""
    long_factor = max(size) // max(1, keep_long_side)
    return tuple(max(1, min(side // (REDUCING_GAP * image_size), long_factor))  # type: ignore[return-value]
                 for side in size)


def decode_for_serving(img: Image.Image, image_size: int, picture_side: int, what: str = "image",
                       fix: str = DATASET_FIX) -> tuple[np.ndarray, Image.Image]:
    """``img`` (opened lazily, not yet decoded) -> (the model's input, uint8 [S, S, 3]; the image
    upright, reduced to about ``picture_side`` on its long side, for a picture drawn over it), with
    no copy of a large image beyond the decoded one and no float copy of it (the server's memory
    bound). A JPEG is decoded at 1/2, 1/4 or 1/8 scale by its DCT (``draft``), to an integer
    fraction of its size that keeps each side >= REDUCING_GAP x ``image_size`` and the long side >=
    ``picture_side``; high-depth grey is box-reduced (``Image.reduce``, as 32-bit integers) to that
    size before its scaling to 8 bits. Every other image is decoded in full and resized exactly as
    ``predict`` resizes it: the same pixels (docs/usage.md, "Security: the server")."""
    orientation = exif_orientation(img)
    factors = _reduction(img.size, image_size, picture_side)
    if max(factors) > 1 and img.format == "JPEG":
        img.draft(None, (-(-img.size[0] // factors[0]), -(-img.size[1] // factors[1])))
    img = decoded(img, what, fix)
    if is_high_depth(img.mode):  # to_8bit_grey would hold float64 copies of it: reduce it first
        factors = _reduction(img.size, image_size, picture_side)
        if max(factors) > 1:
            img = (img.convert("I") if img.mode.startswith("I;") else img).reduce(factors)
    if orientation != 1:
        img = img.transpose(_ORIENTATION_TRANSPOSE[orientation])
    pixels = resized_rgb(img, image_size)
    factor = max(img.size) // max(1, picture_side)  # one factor: the picture keeps its aspect
    if factor > 1 and img.mode not in _NOT_REDUCIBLE:
        img = img.reduce(factor)
    return pixels, img
