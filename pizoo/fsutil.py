"""Crash-safe file system helpers: the one write path every pizoo writer uses.

- Atomic outputs: everything pizoo writes goes to a temporary sibling first and is renamed into
  place, so a crash, SIGKILL or Ctrl-C leaves either the old artifact or the new one, never a mix.
- One error line: an OSError while writing (read-only file system, disk full, a file where a folder
  should be, permission denied, ...) becomes a PizooError naming the path and the cause, after the
  temporaries are removed (`writing`, used by every atomic writer).
- --overwrite (`check_output`): only ever replaces an output pizoo itself wrote (`is_pizoo_output`),
  an empty folder, or nothing; never a user's folder or file, never the input model.
- Locks (`output_lock`): one writer per output at a time; a second one gets one line naming the
  holder. The lock is an flock, so it dies with its process, even on SIGKILL.
- Stale temporaries (`remove_stale_temps`): a killed writer's temporaries (files and folders) are
  removed by the next writer of the same output, but only pizoo's own names and only those no live
  process holds (each temporary carries an flock while it is written).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from .errors import PizooError

_HASH_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so big weights never sit in RAM."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Write errors: one line naming the path and the cause

# errno -> what to do about it (the cause itself is the system's own words, os.strerror).
_FIXES = {
    errno.EROFS: "write to a writable disk (another --out, or another PIZOO_HOME)",
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space or write to another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
    errno.EEXIST: "a file or folder of that name is in the way; move it or choose another path",
    errno.EISDIR: "it is a folder, not a file; give a file path",
    errno.EACCES: "permission denied; choose a place you may write to",
    errno.EPERM: "not permitted; choose a place you may write to",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.EIO: "the disk reported an input/output error; check it, or write elsewhere",
    errno.EINVAL: "this file system does not accept it; write to an ordinary folder",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n)",
}
_RUST_OS_ERROR = re.compile(r"(?:Os \{ code: |os error )(\d+)")


def os_error_of(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`: itself, one in its chain, or one that a Rust extension (safetensors,
    tokenizers) only reports in its message ("Os { code: 28, ... }"). None when it is not about I/O."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        m = _RUST_OS_ERROR.search(str(e)) if not isinstance(e, PizooError) else None
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: str | os.PathLike, exc: OSError, verb: str = "cannot write") -> PizooError:
    """One line: the path (the error's own file when it names one), the system's cause, the fix."""
    where = Path(exc.filename) if isinstance(exc.filename, (str, os.PathLike)) else Path(path)
    where = _public_name(where)
    cause = exc.strerror or os.strerror(exc.errno or 0)
    fix = _FIXES.get(exc.errno or 0)
    if exc.errno == errno.ENOENT:
        parent = where.parent
        fix = (f"{parent} does not accept new files; write to an ordinary folder" if parent.is_dir()
               else "a folder on the way does not exist; fix the path")
    return PizooError(f"{where}: {verb} ({cause.lower()}); {fix or 'check the path and the disk'}")


def _public_name(where: Path) -> Path:
    """A pizoo temporary (.NAME.XXXXXXXX.tmp, or a file inside one) or lock (.NAME.lock) is reported
    as the output it stands for, so the message names something the user knows."""
    for part in (where, *where.parents):
        m = re.fullmatch(r"\.(.+)\.(?:[a-z0-9_]{8}\.(?:tmp|old)|lock)", part.name)
        if m:
            return part.parent / m.group(1)
    return where


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised while writing `path` into one PizooError line (path, cause, fix).

    Wrap the whole write, cleanup included, so the message comes after the temporaries are gone."""
    try:
        yield
    except PizooError:
        raise
    except Exception as e:
        oe = os_error_of(e)
        if oe is None:
            raise
        raise write_error(path, oe) from None


def make_dirs(path: str | os.PathLike) -> Path:
    """mkdir -p with the one-line error (a file in the way, a read-only disk, ...)."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def new_dirs(path: str | os.PathLike) -> Iterator[Path]:
    """make_dirs for a writer that fills `path` itself: when the body fails, the folders this call
    created are removed again if they are still empty (the body's atomic writers removed their
    temporaries), so a failed write leaves no empty output folder behind."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    make_dirs(path)
    try:
        yield path
    except BaseException:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


# ------------------------------------------------------------------------------------------------
# What --overwrite may replace

# What makes a folder recognisably pizoo's own output (one is enough):
#   run.json          a `pizoo extend` release folder
#   calibration.json  a `pizoo calibrate` output
#   eval.json         a `pizoo eval` output folder
#   config.json with a top-level "pizoo" block   an HF folder pizoo wrote (calibrate, import)
#   README.md saying "Written by pizoo"          a TensorRT-LLM checkpoint pizoo wrote
# and a file: a GGUF file with pizoo's `pizoo.config` key (every pizoo export writes it).
PIZOO_FOLDER_MARKS = ("run.json", "calibration.json", "eval.json")
PIZOO_README_MARK = "Written by pizoo"
PIZOO_GGUF_KEY = "pizoo.config"


def is_pizoo_output(path: str | os.PathLike) -> bool:
    """True when `path` is an output pizoo itself wrote (see PIZOO_FOLDER_MARKS); nothing else may
    ever be replaced by --overwrite."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        if any((path / m).is_file() for m in PIZOO_FOLDER_MARKS):
            return True
        with contextlib.suppress(OSError, ValueError):
            if isinstance(json.loads((path / "config.json").read_text(encoding="utf-8")).get("pizoo"), dict):
                return True
        with contextlib.suppress(OSError, ValueError):
            with open(path / "README.md", encoding="utf-8") as f:
                if PIZOO_README_MARK in f.read(4096):
                    return True
        return False
    if path.is_file() and path.suffix.lower() == ".gguf":
        try:
            from gguf import GGUFReader

            return PIZOO_GGUF_KEY in GGUFReader(path, "r").fields
        except Exception:  # not a GGUF file at all
            return False
    return False


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path:
    """--out must be neither an input (the model being read) nor a folder that holds one."""
    out = Path(out)
    resolved = out.resolve()
    for src in inputs:
        src_r = Path(src).resolve()
        if resolved == src_r or resolved in src_r.parents:
            raise PizooError(f"--out {out}: is the input {src}{'' if resolved == src_r else ' or holds it'}; pizoo "
                             "never writes over what it reads; choose another --out")
    return out


def check_output(out: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                 folder: bool = True) -> Path:
    """The one --out rule of every writer, checked before any work is done.

    - never the input (the model being read) nor a folder that holds it;
    - a file where a folder output goes (or the reverse) is refused;
    - an existing output needs --overwrite, and --overwrite only replaces an output pizoo wrote
      (is_pizoo_output) or an empty folder: never a user's folder or file."""
    out = check_not_input(out, inputs)
    if not os.path.lexists(out):
        return out
    if folder and not out.is_dir():
        raise PizooError(f"--out {out}: is a file, not a folder; choose another --out (pizoo never replaces it)")
    if not folder and out.is_dir():
        raise PizooError(f"--out {out}: is a folder; give a file path or a folder to write into")
    if not overwrite:
        raise PizooError(f"{out}: already exists; pass --overwrite or choose another --out")
    if not (_is_empty_dir(out) or is_pizoo_output(out)):
        raise PizooError(f"{out}: exists and was not written by pizoo, so --overwrite will not replace it; move it "
                         "away or choose another --out")
    return out


# ------------------------------------------------------------------------------------------------
# Locks


def lock_path_for(path: str | os.PathLike) -> Path:
    """The lock file of an output: a hidden sibling, .NAME.lock (an output folder appears only when
    complete, so its lock cannot live inside it)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(lock.read_text(encoding="utf-8"))
        return f"pid {info['pid']}, {info['command']}, since {info['since']}"
    return "another process"


class _LockWait(Exception):
    pass


def _raise_lock_wait(signum, frame) -> None:
    raise _LockWait


def _flock_within(fd: int, seconds: float) -> bool:
    """Take an exclusive flock on `fd`, waiting at most `seconds` (0: not at all). In the main thread
    the wait blocks in the kernel (queued, fair) under a timer; elsewhere it polls."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if seconds <= 0:
            return False
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        old = signal.signal(signal.SIGALRM, _raise_lock_wait)
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            fcntl.flock(fd, fcntl.LOCK_EX)
            return True
        except _LockWait:
            return False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
    return False


@contextlib.contextmanager
def hold_lock(lock: str | os.PathLike, subject: str | os.PathLike, *, wait: float = 0.0,
              advice: str = "wait for it to finish or choose another --out") -> Iterator[None]:
    """Hold an exclusive flock on the file `lock` for the body; it records who holds it.

    wait=0: a held lock is refused at once with one line naming the holder; wait>0: wait that many
    seconds first. The lock file is removed on release; a waiter that got the lock of a file removed
    meanwhile tries again on the new one, so two holders can never coexist."""
    lock = Path(lock)
    deadline = time.monotonic() + wait
    make_dirs(lock.parent)
    while True:
        with writing(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not _flock_within(fd, deadline - time.monotonic()):
            holder = _holder(lock)
            os.close(fd)
            raise PizooError(f"{subject}: another pizoo process is writing it ({holder}); {advice}")
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed that file: lock the new one
    try:
        command = "pizoo " + (sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "")
        record = {"pid": os.getpid(), "command": command.strip(), "since": dt.datetime.now().strftime("%H:%M:%S")}
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def output_lock(path: str | os.PathLike, *, wait: float = 0.0) -> contextlib.AbstractContextManager:
    """One writer per output (file or folder) at a time; see hold_lock."""
    return hold_lock(lock_path_for(path), path, wait=wait)


# ------------------------------------------------------------------------------------------------
# Atomic writes


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
    """The names mkstemp/mkdtemp give pizoo's temporaries of `path`: .NAME.XXXXXXXX.tmp (and the
    .NAME.XXXXXXXX.old folder replace_dir parks an old output in)."""
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.(tmp|old)")


def _unheld(fd: int) -> bool:
    """Take the flock of a temporary: possible only when no live process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of `path` that a killed writer left (SIGKILL, power loss).

    Only pizoo's own names (.NAME.XXXXXXXX.tmp beside `path`: files from atomic_path, folders from
    atomic_dir), and only those no live process holds: each keeps an exclusive flock on its
    temporary while it writes, and the kernel drops the lock when its process dies. A parked old
    output (.NAME.XXXXXXXX.old/old, from a replace_dir killed between its two renames) is put back
    when `path` is missing, else removed. Returns what was removed."""
    path = Path(path)
    pattern, removed = _temp_pattern(path), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if not m:
            continue
        cand = path.parent / name
        try:
            fd = os.open(cand, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            mode = os.fstat(fd).st_mode
            if m.group(1) == "old":
                if stat.S_ISDIR(mode):
                    if not os.path.lexists(path) and os.path.lexists(cand / "old"):
                        os.replace(cand / "old", path)
                    shutil.rmtree(cand)
                    removed.append(cand)
            elif stat.S_ISREG(mode) and _unheld(fd):
                os.unlink(cand)
                removed.append(cand)
            elif stat.S_ISDIR(mode) and _unheld(fd):
                shutil.rmtree(cand)
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
    fsynced); on any exception, KeyboardInterrupt included, it is removed, and an OSError becomes one
    PizooError line (see `writing`). Stale temporaries of the same `path` left by killed writers are
    removed first (see remove_stale_temps)."""
    path = Path(path)
    with writing(path):
        make_dirs(path.parent)
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
    (a folder cannot be renamed over a non-empty one) and deleted afterwards. A kill between the two
    renames leaves the old one parked in .NAME.XXXXXXXX.old, which remove_stale_temps puts back."""
    with writing(dst):
        make_dirs(dst.parent)
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

    With overwrite=False an existing `path` is an error (checked before any work is done). The
    temporary carries an flock while it is written, so only a dead writer's is ever swept (see
    remove_stale_temps); on failure it is removed and an OSError becomes one PizooError line.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise PizooError(f"{path}: already exists; pass --overwrite or choose another --out")
    with writing(path):
        make_dirs(path.parent)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield tmp
            os.chmod(tmp, _default_mode(0o777))
            replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            os.close(fd)


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


# ------------------------------------------------------------------------------------------------
# Test hook: a signal at the N-th write

FAULT_ENV = "PIZOO_TEST_FAULT"
_SIGNALS = {"kill": 9, "int": 2, "term": 15}


def install_fault_hook(spec: str | None = None) -> None:
    """PIZOO_TEST_FAULT=SIGNAL:N (kill, int or term; or `spec`) sends this process the signal at its N-th
    write from now: a file opened for writing, or a rename (the moment a finished temporary is
    published). The fault-injection tests use it to stop every writer at every point that matters;
    unset, it does nothing. It fires once (an audit hook stays installed, but only counts after)."""
    spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
    name, _, nth = spec.partition(":")
    if name not in _SIGNALS or not nth.isdigit():
        return
    count, target, signum = [0], int(nth), _SIGNALS[name]

    def audit(event: str, args: tuple) -> None:
        if event == "os.rename":
            pass
        elif event == "open" and len(args) == 3:
            mode, flags = args[1], args[2]
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
            if not writes or str(args[0]).endswith(".lock"):
                return
        else:
            return
        count[0] += 1
        if count[0] == target:
            os.kill(os.getpid(), signum)

    sys.addaudithook(audit)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
