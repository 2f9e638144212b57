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

import numpy as np
import torch
from PIL import Image

from .pixels import decoded, image_from_array, is_high_depth, open_image, resized_rgb

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

def load_image(image, image_size: int) -> torch.Tensor:
    """A path, PIL image or ndarray -> normalised FloatTensor [3, S, S] (docs/design.md §5).

    An ndarray is read as RGB(A) or grey in its own dtype's range (uint8, uint16, float in 0..1).
    """
    if isinstance(image, Image.Image):
        return image_to_tensor(decoded(image, "image"), image_size)
    if isinstance(image, np.ndarray):
        return image_to_tensor(image_from_array(image), image_size)
    with open_image(image) as opened:
        return image_to_tensor(decoded(opened, "image"), image_size)


def image_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    return normalize_image(image_to_uint8(img, image_size))


def image_to_uint8(img: Image.Image, image_size: int) -> torch.Tensor:
    """The resized RGB image as uint8 [3, S, S]: a quarter of the bytes of the normalised tensor, so
    loader workers hand batches over faster; :func:`normalize_image` finishes it on any device."""
    return torch.from_numpy(resized_rgb(img, image_size)).permute(2, 0, 1).contiguous()


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
    if is_high_depth(img.mode):
        binary = np.asarray(img) > 0  # same as convert("L") > 0 for integers, and keeps 0 < v < 0.5 for floats
    else:
        binary = np.asarray(img.convert("L")) > 0
    m = Image.fromarray(binary.astype(np.uint8) * 255).resize((image_size, image_size), Image.BILINEAR)
    soft = np.asarray(m, dtype=np.float32) / 255.0
    return torch.from_numpy((soft > 0.5).astype(np.float32))
