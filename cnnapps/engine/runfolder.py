"""A run folder owned by one process: a lock naming its holder, refusal to reuse a finished folder by accident,
no stale temporary files, and writes that leave every file either complete or absent."""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"
# files that mark a folder as holding a run (what `train` writes first)
RUN_MARKERS = ("run.json", "config.toml", "metrics.jsonl", "checkpoints")


class RunFolderError(RuntimeError):
    """The run folder cannot be used: it holds another run, another process holds it, or it cannot be written."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync'd and renamed over it, so a
    crash leaves the old file or the new one, never half of one. The file gets the usual mode (0666 less the
    umask), like any file ``open`` creates."""
    path = Path(path)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:  # a read-only folder, a full disk: one line naming the file
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise RunFolderError(f"{path}: cannot write: {exc.strerror or exc}") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_run_folder(folder: Path) -> bool:
    """True when ``folder`` already holds (part of) a training run."""
    return folder.is_dir() and any((folder / m).exists() for m in RUN_MARKERS)


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files that an interrupted atomic write left in ``folder`` or its ``checkpoints/``."""
    found: list[Path] = []
    for where in (folder, folder / "checkpoints"):
        if where.is_dir():
            found += [p for p in where.glob(".*.tmp") if p.is_file()]
    return found


class RunFolder:
    """The folder of one training run, held for the length of a ``with`` block.

    ``RunFolder(path, resume=False, overwrite=False)``: entering takes an exclusive lock (``.lock``, released by
    the operating system when the process dies, even by SIGKILL) and refuses, with a RunFolderError naming the
    folder: a folder another live process holds (naming its pid and command); a folder that already holds a run
    when neither ``resume`` nor ``overwrite`` is given. ``overwrite`` empties a run folder first (never a folder
    that holds no run). Temporary files that a killed process left behind are removed.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self._fd: int | None = None

    def __enter__(self) -> "RunFolder":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ---- the lock
    def acquire(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{path}: exists and is not a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as exc:
            raise RunFolderError(f"{path}: cannot create the run folder: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            who = json.loads(holder) if holder.startswith("{") else {}
            raise RunFolderError(
                f"{path}: in use by another run (pid {who.get('pid', '?')} on {who.get('host', '?')}, started "
                f"{who.get('started', '?')}: {who.get('command', '?')}); wait for it or choose another --out"
            ) from None
        self._fd = fd
        try:
            self._check_reuse()
            for tmp in stale_temporaries(path):
                tmp.unlink(missing_ok=True)
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                      "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _check_reuse(self) -> None:
        if self.resume or not is_run_folder(self.path):
            return
        if not self.overwrite:
            raise RunFolderError(f"{self.path}: already holds a run; use --resume to continue it, --overwrite to "
                                 "replace it, or another --out")
        for child in self.path.iterdir():
            if child.name == LOCK_NAME:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    # ---- files
    def write_text(self, name: str, text: str) -> Path:
        """Atomically write ``name`` inside the folder."""
        return write_atomic(self.path / name, text)
