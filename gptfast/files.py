"""Files the library writes and reads: atomic writes that never leave a half-written file where
a good one was, and input and output paths checked with one-line errors. Imports nothing from gptfast,
so every module may use it (data, checkpoints, weights, plots)."""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from pathlib import Path

# Written beside the target: NAME.<8 hex>.<pid>-<host>.tmp, so a later save can tell an orphan
# (its process is gone) from another process's save in progress.
_TMP = re.compile(r"(?:[0-9a-f]{8}\.(?P<pid>\d+)-(?P<host>.*)|[a-z0-9_]{8})")  # ours | tempfile.mkstemp's
_WRITE_FAILED = ("inline_container", "file write failed", "I/O error", "requested and")


def existing_file(path, what: str) -> Path:
    """`path` as a Path when it is a file; else a one-line error saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def check_writable(path) -> Path:
    """Fail before any work, not at the first save: `path` must not be a folder, and its folder
    must be creatable and writable (a file is created and removed there)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path.parent):
        pass
    return path


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path`; when the block succeeds, move it onto `path` in one
    rename, so a crash never leaves a half-written file where a good one was.

    The new file gets the permissions a plain open() would give: the umask's for a new file, the
    old file's own for a replaced one. Temporary files orphaned by a killed save are removed. A
    full disk is one line naming `path` (torch reports it as an "enforce fail")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    tmp = _temporary(path)
    mode = _plain_mode(tmp)
    try:
        if path.is_file():
            mode = stat.S_IMODE(path.stat().st_mode)
        with _write_errors(path):
            yield tmp
            os.chmod(tmp, mode)  # again: a writer may have replaced the file (safetensors writes 0600)
            _fsync(tmp)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a new, empty folder beside `path`; when the block succeeds, it takes `path`'s place.
    Files of an existing `path` that the block did not write are carried over (hard links where
    possible). A failed or killed write (a full disk) leaves `path` as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    new = _temporary(path)
    os.mkdir(new)  # 0o777 & ~umask, as a plain mkdir
    try:
        mode = _plain_mode(new / ".mode")
        os.unlink(new / ".mode")
        with _write_errors(path):
            yield new
            for f in new.iterdir():  # what the block wrote (safetensors writes 0600)
                if f.is_file():
                    os.chmod(f, mode)
            if path.is_dir():
                os.chmod(new, stat.S_IMODE(path.stat().st_mode))
                shutil.copytree(path, new, dirs_exist_ok=True, copy_function=_link_or_copy,
                                ignore=lambda d, names: [n for n in names if n.endswith(".tmp")
                                                          or (new / Path(d).relative_to(path) / n).exists()])
            for f in new.rglob("*"):
                if f.is_file():
                    _fsync(f)
            _swap(new, path)
    finally:
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)


def _plain_mode(path: Path) -> int:
    """Create `path` as a plain open() would (0o666 less the umask) and return its mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return stat.S_IMODE(os.stat(path).st_mode)


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}.{os.getpid()}-{socket.gethostname()}.tmp")


def _fsync(path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _swap(new: Path, path: Path) -> None:
    """Put folder `new` where `path` is. Two renames: a kill between them leaves the previous
    folder as PATH.<hex>.old (never cleaned up automatically), so it is not lost either way."""
    if not path.exists():
        os.rename(new, path)
        return
    old = path.with_name(f"{path.name}.{secrets.token_hex(4)}.old")
    os.rename(path, old)
    os.rename(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _write_errors(path):
    """A write that fails for lack of space is one line naming `path`, whatever library wrote."""
    try:
        yield
    except Exception as e:
        if _is_write_failure(e):
            raise OSError(f"disk full / cannot write {path} ({_first_line(e)})") from None
        raise


def remove_orphaned_temporaries(path) -> list[Path]:
    """Remove atomic_file's / atomic_dir's temporaries for `path` whose writer is gone (killed
    mid-save): ours from a dead process on this host, and mkstemp-named ones from older versions.
    Returns them."""
    path, host, removed = Path(path), socket.gethostname(), []
    with contextlib.suppress(OSError):  # an unreadable or read-only folder: nothing to clean
        for tmp in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
            m = _TMP.fullmatch(tmp.name[len(path.name) + 1:-len(".tmp")])
            if m and (m["pid"] is None or (m["host"] == host and not _alive(int(m["pid"])))):
                shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_write_failure(e: Exception) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    # torch.save: RuntimeError "[enforce fail at inline_container.cc:672] unexpected pos"; safetensors:
    # SafetensorError "I/O error: No space left"; numpy's tofile: OSError "N requested and M written"
    return (isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError") and \
        any(s in str(e) for s in _WRITE_FAILED)


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__
