"""A training run's folder (docs/design.md §5): the checkpoints it holds, where ``--resume``
continues from, and the rule that one folder holds one run.

Without the rule, ``train.py`` into a folder of an earlier run replaces ``epoch_1..k`` and keeps the
old ``epoch_k+1..``: two runs mixed under one name. So a folder that holds checkpoints is refused
unless the run continues them (``--resume`` that folder) or ``--overwrite`` clears them first.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..files import translated
from ..model.checkpoint_format import CheckpointError, read_checkpoint
from .checkpoint import threshold_path

#: the files of a run besides its checkpoints (``--overwrite`` removes them with the checkpoints)
RUN_FILES = ("train_history.json", "log.txt")


class RunFolderError(ValueError):
    """A save folder that would mix two runs (an input error: one message, exit 2)."""


def epoch_number(path: Path) -> int:
    """N of ``epoch_N.pth`` (-1 for another name)."""
    tail = path.stem.split("_", 1)[-1]
    return int(tail) if path.stem.startswith("epoch_") and tail.isdigit() else -1


def epoch_files(folder: str | os.PathLike) -> list[Path]:
    """The folder's ``epoch_N.pth`` files, lowest N first."""
    return sorted(Path(folder).glob("epoch_*.pth"), key=epoch_number)


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if a file, else the highest ``epoch_N.pth`` inside the folder."""
    p = Path(path)
    if p.is_file():
        return p
    found = epoch_files(p)
    if not found:
        raise FileNotFoundError(f"--resume {path}: no epoch_N.pth checkpoint there")
    return found[-1]


def resume_checkpoint(path: str | os.PathLike, warn: Callable[[str], None],
                      trust: bool = False) -> tuple[Path, dict]:
    """(file, checkpoint dict) that ``--resume path`` continues from: ``path`` itself if a file, else
    the highest ``epoch_N.pth`` in the folder that reads. A damaged later one (truncated, empty: an
    interrupted copy; corrupt: its contents fail their SHA-256) is passed over with a message through
    ``warn``; a file named directly is not, nor one refused as unsafe (not ``trust``): that is no accident
    of a copy, and the run stops on it."""
    p = Path(path)
    if not p.is_dir():
        return p, read_checkpoint(p, trust)
    found = epoch_files(p)
    if not found:
        raise FileNotFoundError(f"--resume {path}: no epoch_N.pth checkpoint there")
    damaged = []
    for candidate in reversed(found):
        try:
            ckpt = read_checkpoint(candidate, trust)
        except CheckpointError as e:
            if e.kind == "unsafe":
                raise
            damaged.append(str(e))
            continue
        for reason in damaged:
            warn(f"--resume: passing over a damaged checkpoint: {reason}")
        if damaged:
            warn(f"--resume: continuing from {candidate}")
        return candidate, ckpt
    raise CheckpointError(f"--resume {path}: no epoch_N.pth there can be read: {'; '.join(damaged)}", "unreadable")


@dataclass(frozen=True)
class ResumePoint:
    """What ``--resume`` continues from, read once: the file, its checkpoint dict, and the notes on
    damaged later checkpoints passed over (logged by the run)."""

    path: Path
    checkpoint: dict
    notes: tuple[str, ...] = ()

    @classmethod
    def read(cls, path: str | os.PathLike, trust: bool = False) -> "ResumePoint":
        notes: list[str] = []
        found, ckpt = resume_checkpoint(path, notes.append, trust)
        return cls(found, ckpt, tuple(notes))


def _span(files: list[Path]) -> str:
    names = [f.name for f in files]
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}, {len(names)} files"


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def claim_save_folder(save_dir: Path, resume_from: Optional[Path], overwrite: bool,
                      resume_named_file: bool = False, clear: bool = True) -> list[Path]:
    """Make sure ``save_dir`` holds only this run. ``resume_from``: the checkpoint ``--resume``
    continues from (None: a fresh run); ``resume_named_file``: ``--resume`` named that file rather
    than a folder; ``clear``: this process removes what ``overwrite`` clears (under torchrun only
    rank 0 does; every process checks). Returns the files removed; raises :class:`RunFolderError`
    where the folder holds another run's checkpoints."""
    held = epoch_files(save_dir)
    continuing = resume_from is not None and _same_folder(resume_from.parent, save_dir)
    if continuing:
        if overwrite:
            raise RunFolderError(f"--overwrite would remove {resume_from}, the checkpoint --resume continues from; "
                                 f"drop --overwrite to continue the run in {save_dir}, or give another --save_path")
        later = [f for f in held if epoch_number(f) > epoch_number(resume_from)] if resume_named_file else []
        if later:
            raise RunFolderError(
                f"--resume {resume_from} would mix two runs in {save_dir}: it holds later checkpoints "
                f"({_span(later)}) that this run would replace one by one; continue from the latest with "
                f"--resume {save_dir}, or write this branch to another --save_path")
        return []
    if held and not overwrite:
        source = "" if resume_from is None else f" (--resume {resume_from} continues another folder's run)"
        raise RunFolderError(
            f"--save_path {save_dir} holds the checkpoints of an earlier run ({_span(held)}){source}; continue "
            f"that run with --resume {save_dir}, or start afresh with --overwrite (removes them first), or "
            f"choose another --save_path")
    return clear_run(save_dir) if overwrite and clear else []


def clear_run(save_dir: Path) -> list[Path]:
    """Remove a run's checkpoints, their threshold files, its history and log from ``save_dir``."""
    doomed = [p for f in epoch_files(save_dir) for p in (f, threshold_path(f))]
    doomed += [save_dir / name for name in RUN_FILES]
    removed = []
    for path in doomed:
        if path.exists():
            with translated(path):
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed
