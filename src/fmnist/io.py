"""File writing that never leaves a half-written file, and JSON in and out. A leaf module: it
imports nothing else from fmnist, so every other module may use it."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fmnist import FmnistError


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file next to `path`; on success it is fsynced and renamed over `path`,
    on failure removed, so `path` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        share_as_umask_allows(tmp)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def writing(path: str | os.PathLike):
    """Turn a failure to write `path` (a full disk, a quota, a read-only folder) into one
    FmnistError naming it, for the command line to print as one line."""
    try:
        yield
    except OSError as e:
        raise FmnistError(f"{path}: cannot write ({e.strerror or e})") from None


def share_as_umask_allows(path: str | os.PathLike) -> None:
    """Give a file made by `mkstemp` (always 0600) the mode a plain `open` would: 0666 less the
    umask, so that other users, another container's uid or a web server can read what fmnist
    writes when the umask lets them (0644 under the usual 022)."""
    os.chmod(path, 0o666 & ~umask())


@functools.cache
def umask() -> int:
    """The process's umask, read once. Linux shows it in /proc without changing it; elsewhere
    it is set and restored, which is safe on the first call, before any writer thread starts."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FmnistError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FmnistError(f"{path}: not readable JSON ({e})") from None
