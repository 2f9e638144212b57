"""Image and mask preprocessing exactly as docs/design.md §5 fixes it (shared by training, testing and prediction).

Image: PIL bicubic resize to S x S in the image's own mode (aspect ignored), then convert("RGB"),
ToTensor, normalise with the OpenAI CLIP mean/std. PIL resizes "1" and "P" images with nearest
whatever is asked, and "LA"/"RGBA" through premultiplied alpha; that is kept, as the original did.
16-bit and 32-bit grey ("I;16*", "I") and float ("F") images, which the original could not
handle, are first scaled to 8-bit grey by their type's range:

* "I;16", "I;16B", "I;16L", ...: v / 65535 * 255;
* "I" (int32): v / 65535 * 255 when max <= 65535, else v / (2**31 - 1) * 255 (negatives -> 0);
* "F": v * 255 when max <= 1 (negatives -> 0), else min-max scaled to 0..255 (NaN -> 0);

rounded to the nearest integer.

Mask: convert("L"), pixels > 0 -> 255, PIL bilinear resize to S x S, / 255, then > 0.5 -> 1 else 0.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from .errors import DatasetError

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

_HIGH_DEPTH_MODES = ("I", "F")  # plus every "I;16..." mode


def _is_high_depth(mode: str) -> bool:
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


def _from_array(arr: np.ndarray) -> Image.Image:
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


def load_image(image, image_size: int) -> torch.Tensor:
    """A path, PIL image or ndarray -> normalised FloatTensor [3, S, S] (docs/design.md §5).

    An ndarray is read as RGB(A) or grey in its own dtype's range (uint8, uint16, float in 0..1).
    """
    if isinstance(image, Image.Image):
        return image_to_tensor(decoded(image, "image"), image_size)
    if isinstance(image, np.ndarray):
        return image_to_tensor(_from_array(image), image_size)
    with open_image(image) as opened:
        return image_to_tensor(decoded(opened, "image"), image_size)


def image_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    return normalize_image(image_to_uint8(img, image_size))


def image_to_uint8(img: Image.Image, image_size: int) -> torch.Tensor:
    """The resized RGB image as uint8 [3, S, S]: a quarter of the bytes of the normalised tensor, so
    loader workers hand batches over faster; :func:`normalize_image` finishes it on any device."""
    if _is_high_depth(img.mode):
        img = to_8bit_grey(img)
    try:
        img = img.resize((image_size, image_size), Image.BICUBIC).convert("RGB")
    except (ValueError, OSError) as exc:
        name = getattr(img, "filename", "") or "<in-memory image>"
        raise DatasetError(f"image {name} has PIL mode {img.mode!r}, which cannot be resized or converted to RGB "
                           f"({exc}); re-save it as an 8-bit RGB or grey PNG") from None
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize_image(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 (x / 255 - mean) / std, as ToTensor + Normalize compute it.

    Each step is one correctly rounded float32 operation, so CPU and GPU give identical values.
    Two details keep it so on a GPU, and keep it asynchronous: the constants are made on the
    image's device by fills (copying a CPU tensor there would wait for the device), and 255 is a
    device tensor too, because CUDA divides by a CPU scalar as a multiply by its reciprocal, which
    is one bit off x / 255 for 126 of the 256 byte values."""
    dev = u8.device
    x = u8.to(torch.float32) / torch.full((), 255.0, dtype=torch.float32, device=dev)
    mean = torch.stack([torch.full((), m, dtype=torch.float32, device=dev) for m in IMAGE_MEAN]).view(3, 1, 1)
    std = torch.stack([torch.full((), s, dtype=torch.float32, device=dev) for s in IMAGE_STD]).view(3, 1, 1)
    return (x - mean) / std


def load_mask(mask, image_size: int) -> torch.Tensor:
    """A mask path or PIL image -> FloatTensor [S, S] in {0, 1} (docs/design.md §5)."""
    if isinstance(mask, Image.Image):
        return mask_to_tensor(decoded(mask, "mask"), image_size)
    with open_image(mask, "mask") as opened:
        return mask_to_tensor(decoded(opened, "mask"), image_size)


def mask_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    if _is_high_depth(img.mode):
        binary = np.asarray(img) > 0  # same as convert("L") > 0 for integers, and keeps 0 < v < 0.5 for floats
    else:
        binary = np.asarray(img.convert("L")) > 0
    m = Image.fromarray(binary.astype(np.uint8) * 255).resize((image_size, image_size), Image.BILINEAR)
    soft = np.asarray(m, dtype=np.float32) / 255.0
    return torch.from_numpy((soft > 0.5).astype(np.float32))
