"""Crash-safe file system helpers: nothing half-written is ever left at a final path.

Everything pizoo writes goes to a temporary sibling first and is renamed into place, so a crash,
SIGKILL or Ctrl-C leaves either the old artifact or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import PizooError

_HASH_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so big weights never sit in RAM."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _default_mode(base: int) -> int:
    """`base` (0o666 files, 0o777 folders) less the process umask: what open()/mkdir() would give.
    mkstemp/mkdtemp create private 0600/0700 entries, which is wrong for artifacts others read."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of `path` for writing; rename it over `path` only on success."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()


def _temp_pattern(path: Path) -> re.Pattern:
    """The names tempfile.mkstemp gives pizoo's temporaries of `path`: .NAME.XXXXXXXX.tmp"""
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files of `path` that a killed writer left (SIGKILL, power loss).

    Only pizoo's own pattern (.NAME.XXXXXXXX.tmp beside `path`), only regular files, and only those
    no live process holds: atomic_path keeps an exclusive flock on its temporary while it writes, and
    the kernel drops the lock when its process dies. Returns what was removed."""
    path = Path(path)
    pattern, removed = _temp_pattern(path), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not pattern.fullmatch(name):
            continue
        cand = path.parent / name
        try:
            fd = os.open(cand, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            os.unlink(cand)
            removed.append(cand)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path for a writer that opens the file itself (e.g. gguf.GGUFWriter).

    On success the file is fsynced, given the umask's mode and renamed over `path` (then the folder is
    fsynced); on any exception, KeyboardInterrupt included, it is removed. Stale temporaries of the
    same `path` left by killed writers are removed first (see remove_stale_temps)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd = tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks the temporary as in use until this process ends
        yield Path(tmp)
        os.fsync(fd)  # the same inode as whatever the writer opened
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if tmp is None:
            # Interrupted (Ctrl-C, SIGTERM) inside mkstemp, after it created the file but before
            # it told us its name: the file is not locked yet, so the stale-temporary sweep finds it.
            remove_stale_temps(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst` in one rename; an old `dst` is moved aside first
    (a folder cannot be renamed over a non-empty one) and deleted afterwards."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, trash / "old")
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)
    _fsync_dir(dst.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    With overwrite=False an existing `path` is an error (checked before any work is done).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise PizooError(f"{path}: already exists; pass --overwrite or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(0o777))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Read a JSON object, turning every failure into a one-line PizooError that names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PizooError(f"{path}: {what} not found") from None
    except OSError as e:
        raise PizooError(f"{path}: cannot read {what}: {e.strerror}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise PizooError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(obj, dict):
        raise PizooError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
