"""Every file glocalclip writes goes through here: atomically, with normal permissions, and with
one clear message per failure.

Atomic: the content is serialised in memory, written to a hidden temp file in the target's own
folder, fsynced and renamed over the target, so a reader (or a later run) sees the old file or
the new one, never half of one; on any error the temp file is removed. Permissions: the temp file
is created with mode 0o666, which the kernel reduces by the umask (as ``open(path, "w")`` does),
not mkstemp's 0600, so files shared between users stay readable. Errors: an ``OSError`` becomes an
:class:`OutputError` whose message names the path and the fix (disk full, read-only, permission
denied, a file where a folder should be). Leftovers: temp names carry the host and the process id,
so a later start in the folder removes what a killed run left (:func:`remove_leftovers`) and never
touches a live run's files.

No torch, numpy or OpenCV at import: each writer imports what it serialises with.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

#: a temp file: ``.<target name>.<host>.<pid>.<8 hex>.tmp`` beside its target
TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]{8})\.tmp$")
#: a scratch folder of a run (the disk feature cache): ``glocalclip_<kind>_<host>_<pid>_<8 hex>``
TEMP_DIR = re.compile(r"^glocalclip_(?P<kind>[a-z]+)_(?P<host>[A-Za-z0-9-]+)_(?P<pid>\d+)_(?P<token>[0-9a-f]{8})$")
_NAME_PART = 80  # characters of the target's name kept in a temp name (names stay under 255 bytes)


class OutputError(OSError):
    """An output could not be written. ``str(e)`` is one line naming the path and the fix;
    ``errno`` and ``filename`` are those of the underlying error."""

    def __init__(self, message: str, code: int | None = None, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.errno = code
        self.filename = None if path is None else os.fspath(path)

    def __str__(self) -> str:  # OSError's own would print "[Errno N] None: 'path'"
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------- errors
def _file_in_the_way(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` (or ``path`` itself) that exists and is not a folder."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def output_error(exc: OSError, path: str | os.PathLike) -> OutputError:
    """``exc`` (raised while writing ``path``) as one message that says what to do."""
    if isinstance(exc, OutputError):
        return exc
    path = Path(path)
    code = exc.errno
    what = f"cannot write {path}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        msg = f"{what}: no space left on the device (disk full or quota reached); free space there or choose " \
              "another output folder"
    elif code == errno.EROFS:
        msg = f"{what}: {path.parent} is on a read-only file system; choose an output folder on a writable disk"
    elif code in (errno.EACCES, errno.EPERM):
        msg = f"{what}: permission denied; choose a folder you can write to, or get write permission on " \
              f"{path.parent}"
    elif code in (errno.ENOTDIR, errno.EEXIST) and _file_in_the_way(path) is not None:
        blocker = _file_in_the_way(path)
        msg = f"{what}: {blocker} is a file, not a folder; move or rename that file, or choose another output folder"
    elif code == errno.EISDIR:
        msg = f"{what}: a folder of that name is in the way; move it or choose another output name"
    else:
        msg = f"{what}: {exc.strerror or exc}"
    return OutputError(msg, code, path)


@contextlib.contextmanager
def translated(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into an :class:`OutputError` about ``path``. For writers
    that cannot be atomic (a log, an appended CSV), so their failures read like the others'."""
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise output_error(exc, path) from exc


# ---------------------------------------------------------------------------- temp names
def host_tag() -> str:
    """This machine's name as it appears in temp names (letters, digits and '-')."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _temp_path(target: Path) -> Path:
    token = secrets.token_hex(4)
    return target.parent / f".{target.name[:_NAME_PART]}.{host_tag()}.{os.getpid()}.{token}.tmp"


def _open_temp(target: Path) -> tuple[int, Path]:
    """A new temp file beside ``target``, open for writing; mode 0o666 minus the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = _temp_path(target)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def sync_folder(folder: Path) -> None:
    """fsync a folder so a rename in it survives a power cut (where the file system allows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- folders
def make_dirs(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` with :class:`OutputError` on failure (a file in the way, read-only, ...)."""
    folder = Path(folder)
    with translated(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def removed_if_left_empty(folder: str | os.PathLike) -> Iterator[Path]:
    """Around a command that creates ``folder`` early (to fail at once on one that cannot take a file):
    when the command fails, the folders it created (``folder`` and missing parents) are removed again
    while they are empty, so that a failed command leaves no empty folder behind. Folders that were
    there before, or that hold anything, are kept."""
    path = Path(folder).absolute()
    created = []  # deepest first
    while not path.exists() and path != path.parent:
        created.append(path)
        path = path.parent
    try:
        yield Path(folder)
    except BaseException:
        for new in created:
            try:
                new.rmdir()  # only when empty
            except OSError:
                break  # not empty (or gone): its parents are not empty either
        raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts)."""
    if pid <= 0:
        return True  # not a real owner: never treat as dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists but belongs to someone else
        return True
    return True


def _dead_owner(match: re.Match | None) -> bool:
    return match is not None and match["host"] == host_tag() and not pid_alive(int(match["pid"]))


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files and scratch folders that runs on this machine which no longer exist
    left in ``folder`` (killed mid-write). Nothing else is touched: only our own name patterns,
    only when the owning process is gone. Best effort; returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and _dead_owner(TEMP_FILE.match(entry.name)):
                os.unlink(entry.path)
            elif entry.is_dir(follow_symlinks=False) and _dead_owner(TEMP_DIR.match(entry.name)):
                shutil.rmtree(entry.path)
            else:
                continue
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def prepare_output_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder``, prove it takes a file (one byte written, synced and removed), and clear
    the leftovers of killed runs. Called before any long work, so that a read-only, full or
    mistyped output folder stops the run at once rather than after the model is built."""
    folder = make_dirs(folder)
    probe = folder / "write_test"
    with translated(probe):
        fd, tmp = _open_temp(probe)
        try:
            _write_all(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            _unlink_quietly(tmp)
    remove_leftovers(folder)
    return folder


def make_temp_dir(parent: str | os.PathLike, kind: str = "cache") -> Path:
    """A scratch folder ``parent/glocalclip_<kind>_<host>_<pid>_<token>`` that
    :func:`remove_leftovers` clears once this process is gone. The caller removes it when done."""
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"kind must be lower-case letters, got {kind!r}")
    parent = make_dirs(parent)
    with translated(parent):
        while True:
            path = parent / f"glocalclip_{kind}_{host_tag()}_{os.getpid()}_{secrets.token_hex(4)}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue


# ---------------------------------------------------------------------------- writers
def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


#: errors of ``os.link`` on a file system without hard links (then a check and a rename stand in):
#: EINVAL is Windows' FAT/exFAT answer, EACCES some SMB and FUSE mounts' (a folder that is really not
#: writable fails the rename too, with its own error)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EINVAL, errno.EACCES}


def _kept(path: Path) -> OutputError:
    return OutputError(f"cannot write {path}: a file of that name exists and is kept; choose another name, or "
                       "ask for it to be replaced", errno.EEXIST, path)


def refuse_existing(path: str | os.PathLike) -> None:
    """The refusal of ``write_*(replace=False)``, early: before the work whose result ``path`` is for."""
    if os.path.lexists(path):
        raise _kept(Path(path))


def _place_new(tmp: Path, path: Path) -> None:
    """Give the finished temp file the name ``path`` unless a file has it: a hard link fails where the
    name exists, so a file another process puts there meanwhile is kept too (no check-then-rename race)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _kept(path) from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        refuse_existing(path)
        os.replace(tmp, path)
        return
    _unlink_quietly(tmp)  # the file is in place: a temp name left behind (held open elsewhere) is no failure


def write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, replace: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring). ``replace`` False: an existing
    ``path`` is kept and the write refused (:class:`OutputError`, errno EEXIST). Returns the path."""
    path = Path(path)
    make_dirs(path.parent)
    with translated(path):
        fd, tmp = _open_temp(path)
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, path)
            else:
                _place_new(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    sync_folder(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, ensure_ascii: bool = True) -> Path:
    """``obj`` as JSON with a final newline (serialised in full before the file is touched)."""
    buf = io.StringIO()
    json.dump(obj, buf, indent=indent, ensure_ascii=ensure_ascii)
    buf.write("\n")
    return write_text(path, buf.getvalue())


def write_csv(path: str | os.PathLike, header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> Path:
    import csv

    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def write_npy(path: str | os.PathLike, array: Any) -> Path:
    """A numpy array as ``.npy`` (no pickled objects)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return write_bytes(path, buf.getbuffer())


def write_png(path: str | os.PathLike, rgb: Any) -> Path:
    """A uint8 RGB [H, W, 3] (or grey [H, W]) picture as PNG, encoded by Pillow (a base dependency,
    present in the torch-free runtime install too)."""
    import numpy as np
    from PIL import Image

    rgb = np.ascontiguousarray(rgb)
    buf = io.BytesIO()
    try:
        Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)  # fast, as OpenCV's default
    except (TypeError, ValueError, OSError) as e:
        raise OutputError(f"cannot write {path}: Pillow could not encode a {rgb.dtype} {rgb.shape} picture as PNG "
                          f"({e})", None, path) from e
    return write_bytes(path, buf.getbuffer())


def write_figure(path: str | os.PathLike, figure: Any) -> Path:
    """A matplotlib figure as PNG."""
    buf = io.BytesIO()
    figure.savefig(buf, format="png")
    return write_bytes(path, buf.getbuffer())


def write_torch(path: str | os.PathLike, obj: Any, replace: bool = True) -> Path:
    """``torch.save(obj)``; serialised in memory first, so that a full disk is a plain OSError
    (torch's own writer reports it as a C++ "unexpected pos" error) and nothing is half written.
    ``replace``: as :func:`write_bytes`'."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getbuffer(), replace=replace)


def append_text(path: str | os.PathLike, text: str) -> Path:
    """Append ``text`` to ``path`` and flush (a log: not atomic, errors as :class:`OutputError`)."""
    path = Path(path)
    make_dirs(path.parent)
    with translated(path), open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
    return path


def append_all(path: str | os.PathLike, text: str, sync: bool = True) -> Path:
    """Append ``text`` to ``path`` entirely or not at all: on any failure (a full disk, Ctrl-C) the
    file is cut back to its length before, so it never ends in half a row. Flushed (and fsynced with
    ``sync``), so that what was appended survives a crash of this process."""
    path = Path(path)
    data = text.encode("utf-8")
    with translated(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            before = os.fstat(fd).st_size
            try:
                _write_all(fd, data)
                if sync:
                    os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)
    return path
