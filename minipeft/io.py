"""Atomic writes of files and directories: the one helper every save in minipeft uses.

Nothing is half-written and no directory is left half-saved:

* ``atomic_write(path, write)`` — ``write(tmp)`` fills a temporary file in the same
  directory (``.<name>.tmp-<pid>-<random>``), which is fsync'ed and renamed over ``path``
  (``os.replace``: atomic on POSIX), then the directory is fsync'ed. A reader sees the
  complete old file or the complete new one; a crash leaves at most a temporary file,
  removed by the next write once its process is gone.
* ``atomic_directory(path)`` — a context manager that yields a temporary sibling
  directory; the caller writes every file into it, and on a clean exit it is fsync'ed and
  put in place of ``path``. If ``path`` exists, the two are swapped so that at every
  instant ``path`` names either the complete old directory or the complete new one:
  on Linux with ``renameat2(RENAME_EXCHANGE)`` (one atomic system call), elsewhere (or on
  a file system without it) by two renames — old aside, new in. In that fallback there is
  one window, between the two renames, in which ``path`` does not exist; a reader then
  gets "not there" (FileNotFoundError), never a mix, and the next write through this
  helper puts the complete old directory back if the writer died in the window.

Why a swap and no manifest of checksums: a directory is only ever renamed into place
complete, so a loader cannot meet a mix of old and new files without any check of its
own, and adapter directories keep exactly the layout HF PEFT reads and writes (a
manifest would be one more file, and HF-written directories would have none to verify).
Limit: a reader that opens the directory's files one by one *while* a swap happens can
still pair an old file with a new one; what this guarantees is the state on disk after
any crash, and a consistent directory for every reader that does not race a writer.

Entries of an existing directory that the new write does not produce (a README, an
adapter saved in a subdirectory) are carried over into the new directory — hard links,
so no bytes are copied — so saving over a directory replaces what is written and keeps
the rest, as writing the files in place would.

Targets that exist and are not regular files (``/dev/null``, a FIFO, a directory) are
refused for file writes, and existing non-directories for directory writes: replacing a
device node by a regular file is never what the caller meant. New files and directories
get the permissions the user's umask gives (0644/0755 for umask 022), as ``open`` and
``np.save`` would; ``tempfile.mkstemp`` would give 0600.

``check_file_target`` and ``check_directory_target`` test an output before any work is
done (the command line runs them before computing anything).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "OutputPathError",
    "atomic_directory",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_directory_target",
    "check_file_target",
    "save_npy_atomic",
]

PathLike = str | os.PathLike


class OutputPathError(ValueError):
    """An output path that cannot be written: empty, not a regular file, unwritable."""


# ------------------------------------------------------------------------- helpers
def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _as_path(path: PathLike, what: str, argname: str = "path") -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{argname}: expected a str or os.PathLike, got {type(path).__name__}")
    if os.fspath(path) == "":
        raise OutputPathError(f"{argname}: expected a {what} path, got an empty string")
    return Path(path)


def _tmp_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _stale_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _cleanup_stale(parent: Path, name: str) -> None:
    """Remove what writers that died left beside ``parent/name``; restore an old directory
    that a writer set aside and died before renaming the new one in (fallback swap)."""
    pattern = _stale_pattern(name)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _alive(int(m.group(2))):
            continue
        target = parent / name
        if m.group(1) == "old" and not os.path.lexists(target):
            with contextlib.suppress(OSError):
                os.rename(entry.path, target)  # the complete old directory, back in place
                continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)


def _fsync_path(path: PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open directories; the data is fsync'ed
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe_writable(parent: Path, argname: str, shown: PathLike) -> None:
    """Create and remove a probe entry where ``shown``'s parent would be made."""
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise OutputPathError(f"{argname}: cannot write {shown}: {base} is not a directory")
    probe = base / _tmp_name("probe", "tmp")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(
            f"{argname}: cannot write {shown}: directory {base} is not writable "
            f"({exc.strerror or exc})"
        ) from None


# ------------------------------------------------------------------------- checks
def _existing_target(p: Path, argname: str, directory: bool, note: str = "") -> Path | None:
    """The real path of an existing ``p`` of the right kind, None if ``p`` does not exist."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputPathError(f"{argname}: cannot write {p}: {exc.strerror or exc}") from None
    ok, want = (stat.S_ISDIR, "a directory") if directory else (stat.S_ISREG, "a regular file")
    if not ok(st.st_mode):
        raise OutputPathError(
            f"{argname}: expected {want} or a new path, got {_kind(st.st_mode)}: {p}{note}"
        )
    return Path(os.path.realpath(p))


def _check_target(path: PathLike, argname: str, directory: bool) -> Path:
    p = _as_path(path, "directory" if directory else "file", argname)
    target = _existing_target(p, argname, directory) or p
    _probe_writable(target.parent if str(target.parent) else Path("."), argname, p)
    return p


def check_file_target(path: PathLike, argname: str = "path") -> Path:
    """Raise OutputPathError unless ``path`` can be written as a regular file.

    It may exist only as a regular file (or a link to one); its directory, or the nearest
    existing ancestor it would be created in, must be writable (tested by creating and
    removing a probe file). Nothing else is touched.
    """
    return _check_target(path, argname, directory=False)


def check_directory_target(path: PathLike, argname: str = "path") -> Path:
    """Raise OutputPathError unless ``path`` can be (re)written as a directory."""
    return _check_target(path, argname, directory=True)


# ------------------------------------------------------------------------- files
def atomic_write(path: PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, fsync it, rename it over.

    ``path`` may not exist yet (its directory is created) or be a regular file (a link
    to one is followed: the link stays, its target is replaced). Anything else raises
    OutputPathError before ``write`` runs. If ``write`` fails the temporary file is
    removed and ``path`` is untouched. Returns ``path``.
    """
    p = _as_path(path, "file")
    target = _existing_target(p, "path", False, "; refusing to replace it") or p
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(parent, target.name)
    tmp = parent / _tmp_name(target.name, "tmp")
    # created with mode 0666 & ~umask, like open(); mkstemp would give 0600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    os.close(fd)
    try:
        write(str(tmp))
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_path(parent, directory=True)
    return p


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_npy_atomic(path: PathLike, array: Any) -> Path:
    """``np.save`` (no pickle) of a host array to ``path`` atomically; no ".npy" is added."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save appends no ".npy"
            np.save(fh, array, allow_pickle=False)

    return atomic_write(path, write)


# ------------------------------------------------------------------------- directories
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _renameat2 = _libc.renameat2
        _renameat2.argtypes = [
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_uint,
        ]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):
        _renameat2 = None

#: set to False to force the two-rename fallback (tests of the fallback use it)
USE_EXCHANGE = True


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap ``a`` and ``b``; False when the system or file system cannot."""
    if _renameat2 is None or not USE_EXCHANGE:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Put into ``new`` every entry of ``old`` that ``new`` lacks (hard links, no bytes copied)."""
    for entry in os.scandir(old):
        dst = new / entry.name
        if os.path.lexists(dst) or re.fullmatch(r"\..+\.(tmp|old)-\d+-[0-9a-f]{8}", entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dst)
        elif entry.is_dir():
            shutil.copytree(entry.path, dst, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_file():
            _link_or_copy(entry.path, str(dst))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                _fsync_path(full)
        _fsync_path(dirpath, directory=True)


@contextlib.contextmanager
def atomic_directory(path: PathLike, *, keep_existing: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on a clean exit, put it in place of ``path`` atomically.

    With ``keep_existing`` (default), entries of an existing ``path`` that the new
    directory lacks are carried over (hard links). If the body raises, the temporary
    directory is removed and ``path`` is untouched. See the module docstring for the
    guarantee and the one fallback window.
    """
    p = _as_path(path, "directory")
    target = _existing_target(p, "path", True, "; refusing to replace it") or p.absolute()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(parent, target.name)
    tmp = parent / _tmp_name(target.name, "tmp")
    os.mkdir(tmp, 0o777)  # 0777 & ~umask, like mkdir(1)
    try:
        yield tmp
        if keep_existing and target.is_dir():
            _carry_over(target, tmp)
        _fsync_tree(tmp)
        if not os.path.lexists(target):
            os.rename(tmp, target)
        elif _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now names the old directory
        else:
            old = parent / _tmp_name(target.name, "old")
            os.rename(target, old)
            # the one window of the fallback: target does not exist until the next line
            os.rename(tmp, target)
            _fsync_path(parent, directory=True)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(parent, directory=True)
