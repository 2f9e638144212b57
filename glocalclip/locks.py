"""One process at a time in an output folder: a lock file that names its holder.

Two ``glocalclip predict`` runs into one ``--out`` would each append rows and replace each other's maps,
and both report success. The second one therefore refuses, naming the first (its process id, host and
start time, read from the lock file). The lock itself is the kernel's ``flock`` on that file: it goes
with its process, so a lock file left by a killed run holds nothing and the next run takes it over.
No torch here.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .files import OutputError, host_tag, make_dirs, translated

LOCK_FILE = ".glocalclip.lock"


class FolderInUse(OutputError):
    """The folder is another live process's output (one message naming it, exit 2)."""


def _holder_text(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "a process that is just starting"
    return f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder a lock file names ({} while it is being written)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class FolderLock:
    """``with FolderLock(folder, "predict"):`` holds ``folder/.glocalclip.lock`` for this process or
    raises :class:`FolderInUse` naming the process that holds it. ``taken_over`` names the holder of a
    lock file left by a run that is gone (None when there was none)."""

    def __init__(self, folder: str | os.PathLike, command: str, flag: str = "--out"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command
        self.flag = flag
        self.fd: Optional[int] = None
        self.taken_over: Optional[dict[str, Any]] = None

    def acquire(self) -> "FolderLock":
        import fcntl

        make_dirs(self.folder)
        while True:
            with translated(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._wait_for_name(fd)
                os.close(fd)
                raise FolderInUse(f"{self.flag} {self.folder} is in use by another glocalclip {self.command} "
                                  f"({_holder_text(holder)}); wait for it to finish, or choose another "
                                  f"{self.flag}", errno.EBUSY, self.path) from None
            if self._still_the_file(fd):
                break
            os.close(fd)  # the holder removed it between our open and our lock: try the new one
        left = _read_holder(fd)
        self.taken_over = left or None
        self._write_name(fd)
        self.fd = fd
        return self

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _wait_for_name(fd: int, seconds: float = 1.0) -> dict[str, Any]:
        """The holder's name; it writes it just after taking the lock, so wait a moment for it."""
        deadline = time.monotonic() + seconds
        holder = _read_holder(fd)
        while not holder.get("pid") and time.monotonic() < deadline:
            time.sleep(0.05)
            holder = _read_holder(fd)
        return holder

    def _write_name(self, fd: int) -> None:
        name = {"pid": os.getpid(), "host": host_tag(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:500]}
        with translated(self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(name).encode("utf-8"), 0)
            os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no one takes a file about to vanish)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass  # a read-only folder by now: the lock goes with the descriptor all the same
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
