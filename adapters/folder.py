"""Writing an output folder so that it is always either the complete old folder or the complete new one.

``written_folder(target)`` hands out a fresh sibling ``TARGET.tmp-<pid>`` to write into; when the
body returns, the sibling takes the target's place:

- on Linux, in one step: ``renameat2(RENAME_EXCHANGE)`` swaps the two folders, then the old one
  (now under the temporary name) is removed. The target always exists.
- elsewhere (or on a file system without the exchange): ``TARGET -> TARGET.old-<pid>``,
  ``TARGET.tmp-<pid> -> TARGET``, then the old folder is removed. Between the two renames the target
  is missing; a crash there leaves the complete old folder as ``TARGET.old-<pid>``.

If the body raises, the temporary folder is removed and the target is untouched. A process killed
outright leaves its ``.tmp-<pid>`` / ``.old-<pid>`` sibling behind: the next write into the same
target removes those of processes that no longer run, and refuses to start while one of another
running process is there (two writers into one folder).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def sibling(target: Path, kind: str, pid: int | None = None) -> Path:
    """``TARGET.tmp-<pid>`` or ``TARGET.old-<pid>`` (default: this process)."""
    return target.with_name(f"{target.name}.{kind}-{os.getpid() if pid is None else pid}")


def leftovers(target: Path) -> list[tuple[Path, int]]:
    """``(path, pid)`` of every ``TARGET.tmp-<pid>`` / ``TARGET.old-<pid>`` beside ``target``."""
    if not target.parent.is_dir():
        return []
    name = re.compile(re.escape(target.name) + r"\.(?:tmp|old)-(\d+)")
    found = ((path, name.fullmatch(path.name)) for path in target.parent.iterdir())
    return sorted((path, int(match[1])) for path, match in found if match)


def is_running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, left by an earlier process that had this pid: this process writes nothing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(target: Path) -> None:
    """Remove what killed writers of ``target`` left behind; refuse while another writer runs."""
    for path, pid in leftovers(target):
        if is_running(pid):
            raise FileExistsError(
                f"{path} exists: process {pid} is writing {target} right now; wait for it to finish "
                f"(or, if it is not a ratplus command, remove {path})"
            )
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_target(target: Path, overwrite: bool, is_replaceable: Callable[[Path], bool], what: str) -> None:
    """``target`` may be written: it does not exist, is an empty folder, or (``overwrite``) holds ``what``."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file: give a folder to write")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{target} exists and is not empty: pass --overwrite to replace it")
    if not is_replaceable(target):
        raise FileExistsError(f"{target} is not {what}: --overwrite replaces only that; give a new or empty folder")


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # no such call (not Linux, or an old C library)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def move_into_place(new: Path, target: Path) -> None:
    """``new`` becomes ``target``; the folder that was there is removed."""
    if not target.exists():
        os.rename(new, target)
        return
    if exchange(new, target):
        shutil.rmtree(new)  # now the old folder
        return
    old = sibling(target, "old")
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old)


def check_writable(target: Path, overwrite: bool, is_replaceable: Callable[[Path], bool], what: str) -> None:
    """Clean up after killed writers of ``target`` (``remove_leftovers``), then ``check_target``."""
    remove_leftovers(target)
    check_target(target, overwrite, is_replaceable, what)


@contextmanager
def written_folder(
    target: str | Path, overwrite: bool, is_replaceable: Callable[[Path], bool], what: str
) -> Iterator[Path]:
    """Yield an empty temporary folder to write; it replaces ``target`` when the body returns.

    ``target`` must be free (``check_writable``); ``is_replaceable``/``what``: what ``--overwrite`` may replace.
    """
    target = Path(target)
    check_writable(target, overwrite, is_replaceable, what)
    temporary = sibling(target, "tmp")
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    move_into_place(temporary, target)
