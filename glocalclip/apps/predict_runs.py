"""A ``glocalclip predict`` output folder: rows appended as they are scored, a rerun that never
silently replaces or mixes an earlier run, and ``--resume``. No torch here.

- Every batch's rows go to ``predictions.csv`` and ``predictions.jsonl`` as soon as its maps and
  overlays are written, all of the batch or none of it, flushed: after Ctrl-C, a crash or a full disk
  the files hold every image scored so far, each with its map.
- A folder that holds an earlier run's predictions (or maps, or overlays) is refused unless
  ``--resume`` continues it (the images already in the CSV are skipped) or ``--overwrite`` replaces
  it (its files are removed first, so no stale map of the old run stays beside the new CSV).
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..files import append_all, remove_leftovers, translated, write_text

CSV_NAME = "predictions.csv"
JSONL_NAME = "predictions.jsonl"
#: output subfolders and the files predict writes there
OUTPUT_KINDS = (("maps", ".npy"), ("overlays", ".png"))


def _csv_text(fields: Sequence[str], records: Iterable[dict[str, Any]], header: bool) -> str:
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(fields))
    if header:
        writer.writeheader()
    for r in records:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()


def _jsonl_text(fields: Sequence[str], records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps({k: r.get(k) for k in fields}) + "\n" for r in records)


def _number(text: Optional[str], kind: type) -> Any:
    return None if not text else kind(float(text))


def _typed(row: dict[str, Optional[str]]) -> dict[str, Any]:
    """A CSV row back as the record it was written from (empty cells are None)."""
    return {**{k: (v or None) for k, v in row.items()}, "pred_score": _number(row.get("pred_score"), float),
            "pred_label": _number(row.get("pred_label"), int), "map_max": _number(row.get("map_max"), float)}


def read_rows(csv_path: Path, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The complete rows of an earlier run's CSV (a row cut short by a kill is left out)."""
    with translated(csv_path), open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [_typed(r) for r in rows if r.get("image_path") and all(r.get(k) is not None for k in fields)]


def image_key(path: str | os.PathLike) -> str:
    """How an input is recognised as already scored: its absolute path."""
    return os.path.abspath(os.fspath(path))


def earlier_outputs(out: Path) -> list[Path]:
    """The files of an earlier run in ``out``: its CSV and JSONL where they hold rows, its maps and
    overlays (a CSV with a header alone is a run that scored nothing)."""
    found = [out / name for name in (CSV_NAME, JSONL_NAME) if _has_rows(out / name)]
    for folder, suffix in OUTPUT_KINDS:
        if (out / folder).is_dir():
            found += sorted(p for p in (out / folder).rglob(f"*{suffix}") if p.is_file())
    return found


def _has_rows(path: Path) -> bool:
    if not path.is_file():
        return False
    with translated(path), open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for _, line in zip(range(2), f) if line.strip()]
    return len(lines) > (1 if path.name == CSV_NAME else 0)


def _sweep_leftovers(out: Path) -> None:
    """The temp files a killed run left in ``out`` and its output subfolders (files.remove_leftovers)."""
    folders = [out] + [d for name, _ in OUTPUT_KINDS if (out / name).is_dir()
                       for d in [out / name, *(p for p in (out / name).rglob("*") if p.is_dir())]]
    for folder in folders:
        remove_leftovers(folder)


def _remove(paths: Iterable[Path], out: Path) -> None:
    """Remove ``paths``, then the output subfolders they leave empty."""
    for p in paths:
        with translated(p):
            p.unlink(missing_ok=True)
    for folder, _ in OUTPUT_KINDS:
        root = out / folder
        if root.is_dir():
            for d in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [root]:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()


def _refusal(out: Path, found: list[Path]) -> str:
    csv_path = out / CSV_NAME
    rows = len(read_rows(csv_path, ("image_path",))) if csv_path.is_file() else 0
    what = f"{rows} rows in {CSV_NAME}, " if csv_path.is_file() else ""
    maps = sum(1 for p in found if p.suffix == ".npy")
    return (f"--out {out} holds the predictions of an earlier run ({what}{maps} maps); continue it with --resume "
            f"(the images already in {CSV_NAME} are skipped), replace it with --overwrite (its maps and overlays "
            f"are removed first), or choose another --out")


class PredictionsFile:
    """``predictions.csv`` and ``predictions.jsonl`` of one ``--out``: :meth:`check` decides what an
    earlier run's files become (before the model is built), :meth:`start` makes it so (once the model
    is there), :meth:`append` adds a batch's rows."""

    def __init__(self, out: str | os.PathLike, fields: Sequence[str]):
        self.out = Path(out)
        self.fields = tuple(fields)
        self.kept: list[dict[str, Any]] = []  # the earlier run's rows that --resume continues from
        self._doomed: list[Path] = []  # what --overwrite removes

    def check(self, resume: bool, overwrite: bool) -> "PredictionsFile":
        """Refuse an earlier run's folder unless ``resume`` continues it (its complete rows are
        kept) or ``overwrite`` replaces it. Writes nothing."""
        if resume and overwrite:
            raise ValueError("--resume continues the predictions in --out and --overwrite removes them: give one")
        found = earlier_outputs(self.out)
        if found and not (resume or overwrite):
            raise ValueError(_refusal(self.out, found))
        if overwrite:
            self._doomed = found
        elif (self.out / CSV_NAME).is_file():
            self.kept = read_rows(self.out / CSV_NAME, self.fields)
        return self

    def start(self) -> "PredictionsFile":
        """Clear what ``check`` found for ``--overwrite`` and the leftovers of killed runs, then
        write both files afresh from the rows kept: a JSONL line or a CSV row cut short goes."""
        _sweep_leftovers(self.out)
        _remove(self._doomed, self.out)
        self.rewrite(self.kept)
        return self

    def rewrite(self, records: list[dict[str, Any]]) -> dict[str, Path]:
        """Both files holding ``records``, each replaced atomically."""
        write_text(self.out / CSV_NAME, _csv_text(self.fields, records, header=True))
        write_text(self.out / JSONL_NAME, _jsonl_text(self.fields, records))
        return self.paths()

    def done(self) -> set[str]:
        """The inputs already scored (as :func:`image_key`)."""
        return {image_key(r["image_path"]) for r in self.kept}

    def append(self, records: list[dict[str, Any]]) -> None:
        """A batch's rows, all or none, flushed; the CSV first, so the CSV is never behind."""
        if not records:
            return
        csv_path = self.out / CSV_NAME
        before = csv_path.stat().st_size
        append_all(csv_path, _csv_text(self.fields, records, header=False))
        try:
            append_all(self.out / JSONL_NAME, _jsonl_text(self.fields, records))
        except BaseException:
            os.truncate(csv_path, before)  # the batch is in neither file
            raise

    def paths(self) -> dict[str, Path]:
        return {"csv": self.out / CSV_NAME, "jsonl": self.out / JSONL_NAME}
