"""A training run's folder (docs/design.md §5): the checkpoints it holds, where ``--resume``
continues from, and the rule that one folder holds one run.

Without the rule, ``train.py`` into a folder of an earlier run replaces ``epoch_1..k`` and keeps the
old ``epoch_k+1..``: two runs mixed under one name. So a folder that holds checkpoints is refused
unless the run continues them (``--resume`` that folder) or ``--overwrite`` clears them first.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tqdm import tqdm

from ..files import append_text, prepare_output_dir, translated, write_json, write_torch
from ..model.checkpoint_format import CheckpointError, is_ours, read_checkpoint
from ..model.config import GlocalCLIPConfig
from .checkpoint import threshold_path
from .distributed import DistContext
from .resume_settings import resume_changes, resume_entry
from .settings import TrainConfig

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


# ---------------------------------------------------------------------------- one folder, one run
class RunFolder:
    """The folder of one training run, claimed for it (:func:`open_run`): where the run starts (epoch,
    the checkpoint it continues, every resume with what it changed), its log, its checkpoints and
    their history. Only the main process writes."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True, start_epoch: int = 0,
                 resume_path: Optional[Path] = None, resumes: Optional[list[dict]] = None):
        self.path = Path(path)
        self.is_main = is_main
        self.start_epoch = start_epoch
        self.resume_path = resume_path
        self.resumes = list(resumes or [])

    def log(self, msg: str) -> None:
        if self.is_main:
            tqdm.write(msg)
            append_text(self.path / "log.txt", msg + "\n")

    def save(self, epoch: int, checkpoint: Callable[[], dict], model_config: dict, train_config: dict,
             epochs: list[dict[str, float]]) -> Path:
        """``epoch_N.pth`` (``checkpoint()``: built only by the process that writes) and
        ``train_history.json``: the losses of every epoch so far (a resumed run's earlier ones too)."""
        path = self.path / f"epoch_{epoch}.pth"
        if self.is_main:
            write_torch(path, checkpoint())
            write_json(self.path / "train_history.json", {"model_config": model_config, "train_config": train_config,
                                                          "resumes": self.resumes, "epochs": epochs})
        return path

    def last_checkpoint(self) -> Optional[Path]:
        return (epoch_files(self.path) or [None])[-1]


def open_run(cfg: TrainConfig, model_cfg: GlocalCLIPConfig, ctx: DistContext,
             point: Optional[ResumePoint] = None, trust: bool = False) -> tuple[RunFolder, Optional[dict]]:
    """Claim ``--save_path`` for this run: a folder that cannot take a file stops the run (every process
    alike) before any long work; the checkpoint ``--resume`` names (``point`` if the caller read it
    already) must fit this model; a folder holding another run's checkpoints is refused, or cleared with
    ``--overwrite`` (by rank 0, the others waiting for it). Returns the folder and the checkpoint
    resumed from (None: a fresh run). ``trust``: ``--trust_checkpoint``."""
    save_dir = Path(cfg.save_path)
    prepare_output_dir(save_dir)
    run = RunFolder(save_dir, ctx.is_main)
    notes: list[str] = []  # logged once the folder is this run's
    ckpt = None
    if cfg.resume:
        point = point or ResumePoint.read(cfg.resume, trust)
        notes += point.notes
        ckpt = _check_resume(run, cfg, model_cfg, point, notes.append)
    named_file = cfg.resume is not None and not Path(cfg.resume).is_dir()
    removed = claim_save_folder(save_dir, run.resume_path, cfg.overwrite, resume_named_file=named_file,
                                clear=ctx.is_main)
    ctx.barrier()
    if removed:
        notes.insert(0, f"--overwrite: removed the earlier run's files from {save_dir}: "
                        f"{', '.join(p.name for p in removed)}")
    for note in notes:
        run.log(note)
    return run, ckpt


def _check_resume(run: RunFolder, cfg: TrainConfig, model_cfg: GlocalCLIPConfig, point: ResumePoint,
                  note: Callable[[str], None]) -> dict:
    """Check the checkpoint ``--resume`` continues from was trained with this model and these settings
    (docs/design.md §5), and record on ``run`` what this run changes from its next epoch on."""
    ckpt = point.checkpoint
    if not is_ours(ckpt):
        raise ValueError(f"--resume {cfg.resume}: not a glocalclip training checkpoint")
    saved = GlocalCLIPConfig.from_dict(ckpt["config"])
    if saved != model_cfg:
        diff = {k: (v, getattr(model_cfg, k)) for k, v in dataclasses.asdict(saved).items()
                if v != getattr(model_cfg, k) and k not in ("pretrained", "precision")}
        if diff:
            raise ValueError(f"--resume: the checkpoint was trained with other model settings "
                             f"(checkpoint vs now): {diff}")
    run.resume_path, run.start_epoch = point.path, int(ckpt["epoch"])
    changes = resume_changes(ckpt.get("train_config"), cfg.to_dict())
    for name, (old, new) in changes.items():
        note(f"--resume: {name} {old} -> {new} from epoch {run.start_epoch + 1} on")
    run.resumes = [*ckpt.get("resumes", []), resume_entry(run.start_epoch, str(run.resume_path), changes)]
    return ckpt


def data_identity(dataset: Any) -> dict:
    """What a checkpoint records of its training data: the image count and the classes in order."""
    return {"images": len(dataset), "classes": list(dataset.classes)}


def check_same_data(ckpt: Optional[dict], dataset: Any, data_path: str) -> None:
    """A resumed run trains on the images of its checkpoint: each epoch's batch order names images by
    their position in the data (docs/design.md §5.1)."""
    recorded = ckpt.get("data") if ckpt is not None else None
    now = data_identity(dataset)
    if recorded and recorded != now:
        raise ValueError(f"--resume: {data_path} holds other training data than the checkpoint's "
                         f"({now['images']} images of classes {now['classes']}, the checkpoint "
                         f"{recorded['images']} of {recorded['classes']}); the run can only continue on the same "
                         f"images: give the checkpoint's --train_data_path, or start a new run")
