"""Checkpoint files: ours are written through ``glocalclip.files`` (atomic, normal permissions, one
message per I/O error). The formats themselves are ``model/checkpoint_format.py``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..files import write_torch


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save ``obj`` to ``path`` atomically (the argument order of ``torch.save``)."""
    return write_torch(path, obj)
