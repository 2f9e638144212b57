"""Uploaded bytes -> the model's input, or an :class:`UploadError` with an HTTP status and a message
that names the file and says what is wrong, so a bad upload is answered and the server goes on."""
from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from ..inference.images import LoadedImage, read_image
from ..datasets.errors import DatasetError


class UploadError(ValueError):
    """An upload the service refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, filename: str, image_size: int, max_bytes: int) -> LoadedImage:
    """Decode one uploaded file as ``glocalclip predict`` reads a file (same pixels), keeping its RGB
    for the overlay. 413 too large, 400 empty or truncated, 415 not an image or a mode we cannot use."""
    if len(data) == 0:
        raise UploadError(400, f"{filename}: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise UploadError(413, f"{filename}: larger than this server's limit of {max_bytes / 1e6:g} MB per "
                               f"image (glocalclip serve --max_upload_mb)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't just warn
        try:
            image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UploadError(413, f"{filename}: too many pixels ({e})") from None
        except UnidentifiedImageError:
            raise UploadError(415, f"{filename}: not an image this server can read (PNG, JPEG, BMP, TIFF, "
                                   f"WebP, ...)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise UploadError(415, f"{filename}: not an image this server can read ({e})") from None
        try:
            image.load()
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
            raise UploadError(400, f"{filename}: the image is truncated or corrupt ({e})") from None
    try:
        return read_image(image, image_size, want_rgb=True)
    except (DatasetError, ValueError, OSError) as e:
        raise UploadError(415, f"{filename}: unsupported image (PIL mode {image.mode!r}): {e}") from None
