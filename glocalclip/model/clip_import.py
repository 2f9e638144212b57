"""Importing open_clip, which is where the package first imports torchvision.

A torchvision built for another torch (pip mixing a CPU torch with a CUDA torchvision where the
CPU index could not be reached) fails deep inside torchvision with ``operator torchvision::nms does
not exist`` or an undefined symbol; this turns that into one message naming both versions and the
matched pair to install (README, "Two commands on a fresh machine").
"""
from __future__ import annotations

import importlib
import types

#: the torch / torchvision pair the README's CPU-only line installs and CI tests
MATCHED_PAIR = ("2.14.1", "0.29.1")


class TorchInstallMismatch(ImportError):
    """torch and torchvision are installed but do not belong together."""


def _installed(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def mismatch_message(cause: BaseException) -> str:
    torch_v, vision_v = _installed("torch"), _installed("torchvision")
    torch_pin, vision_pin = MATCHED_PAIR
    return (f"torchvision {vision_v} does not work with torch {torch_v}: it was built for another torch "
            f"({type(cause).__name__}: {cause}). Install a matched pair, e.g. without a GPU: pip install "
            f"torch=={torch_pin} torchvision=={vision_pin} --index-url https://download.pytorch.org/whl/cpu "
            f"(or both from the same CUDA index)")


def _is_mismatch(e: BaseException) -> bool:
    text = str(e)
    return "torchvision::" in text or ("undefined symbol" in text) or ("torchvision" in text and "_C" in text)


def import_open_clip() -> types.ModuleType:
    """``open_clip``, or :class:`TorchInstallMismatch` with one message when torchvision does not fit torch."""
    try:
        importlib.import_module("torchvision")
    except (RuntimeError, ImportError, OSError) as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "torchvision":
            raise  # simply missing: pip's own message says what to install
        if _is_mismatch(e):
            raise TorchInstallMismatch(mismatch_message(e)) from None
        raise
    return importlib.import_module("open_clip")
