"""Find the data folder (--data-dir, then $CNNAPPS_DATA, then a default) and the prepared-cache folder."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_DIRS = (Path.cwd() / "data", Path.cwd().parent / "shared" / "data", Path.home() / "cnnapps-data")


class DataNotFoundError(FileNotFoundError):
    """A data set folder or file is missing; the message says where we looked."""


def find_data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """Return the data root: ``data_dir`` if given, else ``$CNNAPPS_DATA``, else the first default that exists."""
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"--data-dir {root} is not a directory")
        return root.resolve()
    env = os.environ.get("CNNAPPS_DATA")
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"$CNNAPPS_DATA={env} is not a directory")
        return root.resolve()
    for candidate in DEFAULT_DATA_DIRS:
        if candidate.is_dir():
            return candidate.resolve()
    looked = ", ".join(str(p) for p in DEFAULT_DATA_DIRS)
    raise DataNotFoundError(f"no data folder: pass --data-dir or set CNNAPPS_DATA (also looked in {looked})")


def require_path(path: Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise a DataNotFoundError that names it and what it should hold."""
    if not path.exists():
        raise DataNotFoundError(f"{what} not found: {path}")
    return path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder for prepared caches: ``$CNNAPPS_CACHE`` or ``~/.cache/cnnapps``, plus parts."""
    base = Path(os.environ.get("CNNAPPS_CACHE", Path.home() / ".cache" / "cnnapps")).expanduser()
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
