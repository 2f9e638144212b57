"""Heat maps over pictures, the colour bar that says what the colours mean, and captions, with numpy
and Pillow alone: ``predict --model`` draws its overlays in the torch-free runtime install, which has
no OpenCV (docs/usage.md), and the test grids use the same colours.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# JET as piecewise-linear ramps of the normalised value, per channel: dark blue, blue, cyan, yellow,
# red, dark red (OpenCV's COLORMAP_JET and matplotlib's "jet" to within a few levels)
_JET_X = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


def jet(norm: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape [...]) -> uint8 RGB [..., 3]; blue is low, red is high."""
    v = np.clip(np.asarray(norm, dtype=np.float32), 0.0, 1.0)
    channels = [np.interp(v, _JET_X, _JET_RGB[:, c]) for c in range(3)]
    return (np.stack(channels, axis=-1) * 255 + 0.5).astype(np.uint8)


def normalised(amap: np.ndarray, value_range: Optional[tuple[float, float]]) -> np.ndarray:
    """``amap`` scaled to [0, 1] over ``value_range`` (lo, hi), else over its own min..max."""
    amap = amap.astype(np.float32)
    lo, hi = value_range if value_range is not None else (float(amap.min()), float(amap.max()))
    if hi <= lo:
        return np.zeros_like(amap)
    return np.clip((amap - lo) / (hi - lo), 0.0, 1.0)


def resized_map(amap: np.ndarray, height: int, width: int) -> np.ndarray:
    """A float map [h, w] bilinearly resized to [height, width] (Pillow's float mode: values kept)."""
    if amap.shape == (height, width):
        return amap.astype(np.float32)
    img = Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32), mode="F")
    return np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.float32)


def heat_overlay(image_rgb: np.ndarray, amap: np.ndarray, value_range: Optional[tuple[float, float]] = None,
                 alpha: float = 0.5) -> np.ndarray:
    """The JET colours of ``amap`` (resized to the image) blended over ``image_rgb`` (uint8 [H, W, 3])."""
    h, w = image_rgb.shape[:2]
    heat = jet(normalised(resized_map(amap, h, w), value_range)).astype(np.float32)
    return (alpha * heat + (1 - alpha) * image_rgb.astype(np.float32)).astype(np.uint8)


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's own scalable font (Pillow >= 10.1 ships one), else DejaVu Sans, else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # an older Pillow: no size
        try:
            return ImageFont.truetype("DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default()


def colour_bar(width: int, value_range: tuple[float, float], label: str = "anomaly map") -> np.ndarray:
    """A strip uint8 [h, width, 3] to put under a picture: the JET ramp from ``value_range``'s low end
    (left) to its high end (right), the two ends written under it, and ``label`` between them where it fits."""
    lo, hi = float(value_range[0]), float(value_range[1])
    size = int(np.clip(width / 28, 9, 16))
    pad = max(2, size // 3)
    bar_h = max(6, size)
    strip = Image.new("RGB", (width, bar_h + size + 3 * pad), (255, 255, 255))
    ramp = jet(np.linspace(0.0, 1.0, max(1, width - 2 * pad))[None, :].repeat(bar_h, 0))
    strip.paste(Image.fromarray(ramp), (pad, pad))
    draw = ImageDraw.Draw(strip)
    face = font(size)
    y = bar_h + 2 * pad
    span = hi - lo
    decimals = min(6, max(0, 2 - math.floor(math.log10(span)))) if span > 0 else 3  # 0 .. 4 -> 0.00 .. 4.00
    low, high = f"{lo:.{decimals}f}", f"{hi:.{decimals}f}"
    draw.text((pad, y), low, fill=(0, 0, 0), font=face)
    draw.text((width - pad, y), high, fill=(0, 0, 0), font=face, anchor="ra")
    room = width - 2 * pad - draw.textlength(low, font=face) - draw.textlength(high, font=face) - 2 * size
    if label and draw.textlength(label, font=face) <= room:  # where it fits between the ends
        draw.text((width // 2, y), label, fill=(0, 0, 0), font=face, anchor="ma")
    return np.asarray(strip)


def with_colour_bar(picture: np.ndarray, value_range: tuple[float, float], label: str = "anomaly map") -> np.ndarray:
    """``picture`` (uint8 [H, W, 3]) with its :func:`colour_bar` underneath."""
    return np.concatenate([picture, colour_bar(picture.shape[1], value_range, label)], axis=0)


def inset_colour_bar(picture: np.ndarray, value_range: tuple[float, float], label: str = "anomaly map"
                     ) -> np.ndarray:
    """``picture`` (uint8 [H, W, 3]) with its :func:`colour_bar` drawn over its bottom edge, so that the
    picture keeps its size (an overlay lines up pixel for pixel with the image it covers)."""
    h, w = picture.shape[:2]
    out = np.array(picture, copy=True)
    strip = colour_bar(w, value_range, label)[: max(1, h // 2)]  # at most half the picture
    out[h - strip.shape[0]:] = strip
    return out


def captioned(image_rgb: np.ndarray, lines: Sequence[str], color: tuple[int, int, int] = (255, 255, 255)
              ) -> np.ndarray:
    """``lines`` written in the top-left corner with a black rim, so they read on any background;
    a line too long for the picture is wrapped at spaces."""
    img = Image.fromarray(np.ascontiguousarray(image_rgb))
    draw = ImageDraw.Draw(img)
    face = font(int(np.clip(min(img.size) / 22, 10, 28)))
    x = y = 4
    for line in (part for text in lines if text for part in _wrapped(draw, text, face, img.width - 8)):
        draw.text((x, y), line, fill=color, font=face, stroke_width=2, stroke_fill=(0, 0, 0))
        box = draw.textbbox((x, y), line, font=face, stroke_width=2)
        y = box[3] + 2
    return np.asarray(img)


def _wrapped(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=face) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines
