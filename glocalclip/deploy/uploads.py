"""Uploads, read with bounded memory: the multipart body parsed as its bytes arrive (every limit
counted while reading, nothing kept beyond it), then each file decoded, reduced while decoding, into
the model's input, or refused with an :class:`UploadError` that names the file and says what is
wrong, so that one bad file is answered beside the good ones and the server goes on.

The limits and the memory they bound are in docs/usage.md, "Security: the server".
"""
from __future__ import annotations

import asyncio
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Awaitable, BinaryIO, Callable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..inference.images import INPUT_FIX
from ..datasets.errors import DatasetError
from ..datasets.pixels import decode_for_serving, eight_bit, exif_orientation

#: an upload is kept in memory up to this size, on disk (the temp folder) beyond it
SPOOL_BYTES = 1 << 20
FIELD = "files"  # the multipart field the images come in


class UploadError(ValueError):
    """An upload the service refuses: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------- the body
@dataclass
class BodyLimits:
    """What one request may send (``ServeSettings`` fills it from the flags)."""

    file_bytes: int  # one file
    body_bytes: int  # the whole body
    files: int  # files in one request
    seconds: float  # the whole body must arrive within this time


@dataclass
class ReceivedFile:
    """One file part of the body: its bytes in memory up to SPOOL_BYTES, then in a temp file."""

    filename: str
    data: BinaryIO
    size: int = 0


def _mb(n: int) -> str:
    return f"{n / 1e6:g} MB"


class _Parts:
    """python-multipart callbacks collecting the parts named FIELD, counting each file's bytes; a
    file over the limit stops its spooling at the limit and is refused after the chunk."""

    def __init__(self, limits: BodyLimits):
        self.limits = limits
        self.files: list[ReceivedFile] = []
        self.current: Optional[ReceivedFile] = None
        self.error: Optional[UploadError] = None
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self.part_begin, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished}

    def part_begin(self) -> None:
        self._disposition = b""
        self.current = None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        if self._header_field.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field = self._header_value = b""

    def headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self._disposition)
        if options.get(b"name") != FIELD.encode():
            return  # another field: its bytes count against the body, nothing is kept
        if len(self.files) >= self.limits.files:
            self.error = UploadError(413, f"more than {self.limits.files} files in one request; send at most "
                                          f"{self.limits.files} (glocalclip serve --max_files)")
            return
        name = options.get(b"filename", b"upload").decode("utf-8", "replace") or "upload"
        self.current = ReceivedFile(name, tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES))
        self.files.append(self.current)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        f = self.current
        if f is None or self.error is not None:
            return
        room = self.limits.file_bytes - f.size
        f.data.write(data[start:start + min(end - start, room + 1)])  # one byte past the limit, no more
        f.size += end - start
        if f.size > self.limits.file_bytes:
            self.error = UploadError(413, f"{f.filename}: larger than this server's limit of "
                                          f"{_mb(self.limits.file_bytes)} per image (glocalclip serve "
                                          f"--max_upload_mb); the rest of the request was not read")

    def part_end(self) -> None:
        if self.current is not None:
            self.current.data.seek(0)
        self.current = None


Receive = Callable[[], Awaitable[dict[str, Any]]]


class ClientGone(Exception):
    """The client closed the connection before its body arrived: nobody to answer."""


async def receive_files(receive: Receive, headers: dict[str, str], limits: BodyLimits) -> list[ReceivedFile]:
    """The files of a multipart body read from an ASGI ``receive``, counting the body and each file
    as the bytes arrive, with or without Content-Length. Raises UploadError as soon as a limit is
    passed (413), the body is not multipart (400) or it does not arrive in time (408); ClientGone
    when the client goes away. On an error, every file read so far is closed."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limits.body_bytes:
        raise UploadError(413, f"request body of {_mb(int(length))} is over this server's limit of "
                               f"{_mb(limits.body_bytes)} (glocalclip serve --max_request_mb)")
    content_type, options = parse_options_header(headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise UploadError(400, f"send the images as multipart/form-data in the field '{FIELD}' (e.g. curl -F "
                               f"{FIELD}=@image.png), not {content_type.decode('latin-1') or 'an empty body'}")
    parts = _Parts(limits)
    parser = MultipartParser(boundary, parts.callbacks())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.seconds
    received = 0
    try:
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise UploadError(408, f"the request body did not arrive within {limits.seconds:g} s "
                                       f"({received} bytes came); the connection is closed (glocalclip serve "
                                       f"--upload_timeout_s)") from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limits.body_bytes:
                raise UploadError(413, f"request body over this server's limit of {_mb(limits.body_bytes)} "
                                       f"(glocalclip serve --max_request_mb); the rest was not read")
            try:
                parser.write(chunk)
            except Exception as e:  # noqa: BLE001 - python-multipart raises its own error types
                raise UploadError(400, f"the multipart body cannot be parsed ({e})") from None
            if parts.error is not None:
                raise parts.error
            if not message.get("more_body", False):
                break
        parser.finalize()
    except BaseException:
        for f in parts.files:
            f.data.close()
        raise
    return parts.files


# ---------------------------------------------------------------------------- one file
@dataclass
class ServedImage:
    """An upload as the model sees it, and the picture its overlay is drawn on."""

    pixels: np.ndarray  # [S, S, 3] uint8, the model's input
    size: tuple[int, int]  # (height, width) of the upload, upright
    rgb: np.ndarray  # [h, w, 3] uint8, the upload upright at the overlay's size (long side <= overlay_side)


def overlay_size(size: tuple[int, int], overlay_side: int) -> tuple[int, int]:
    """(h, w) of the overlay of an image of ``size`` (h, w): its long side at most ``overlay_side``."""
    h, w = size
    scale = min(1.0, overlay_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def decode_upload(source: BinaryIO, filename: str, image_size: int, max_pixels: int,
                  overlay_side: int) -> ServedImage:
    """Decode one uploaded file (its bytes in ``source``) with bounded memory: its pixel count checked
    from the header before decoding (413 over ``max_pixels``), then decoded by ``decode_for_serving``
    (predict's pixels, except a large JPEG or high-depth image, reduced while decoding). 400 empty or
    truncated, 415 not an image or a mode we cannot use."""
    source.seek(0, 2)
    if source.tell() == 0:
        raise UploadError(400, f"{filename}: the file is empty (0 bytes)")
    source.seek(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't just warn
        try:
            image = Image.open(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UploadError(413, f"{filename}: too many pixels ({e})") from None
        except UnidentifiedImageError:
            raise UploadError(415, f"{filename}: not an image this server can read (PNG, JPEG, BMP, TIFF, "
                                   f"WebP, ...)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise UploadError(415, f"{filename}: not an image this server can read ({e})") from None
        w, h = image.size
        if w * h > max_pixels:
            raise UploadError(413, f"{filename}: too many pixels: {w}x{h} = {w * h / 1e6:.1f} MP, over this "
                                   f"server's limit of {max_pixels / 1e6:g} MP per image (glocalclip serve "
                                   f"--max_image_mp); send it smaller")
        turned = exif_orientation(image) in (5, 6, 7, 8)  # a quarter turn: the sides swap
        try:
            pixels, picture = decode_for_serving(image, image_size, overlay_side, fix=INPUT_FIX)
        except DatasetError as e:
            if "PIL mode" in str(e):  # resized_rgb's message: a mode that cannot become RGB
                raise UploadError(415, f"{filename}: unsupported image: {e}") from None
            raise UploadError(400, f"{filename}: the image is truncated or corrupt "
                                   f"({e.__context__ or e})") from None
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
            raise UploadError(400, f"{filename}: the image is truncated or corrupt ({e})") from None
    size = (w, h) if turned else (h, w)  # (height, width) as shown
    try:
        rgb = eight_bit(picture).convert("RGB")
    except (ValueError, OSError) as e:
        raise UploadError(415, f"{filename}: unsupported image (PIL mode {picture.mode!r}): {e}") from None
    oh, ow = overlay_size(size, overlay_side)
    if rgb.size != (ow, oh):
        rgb = rgb.resize((ow, oh), Image.BILINEAR)
    return ServedImage(pixels, size, np.asarray(rgb))
