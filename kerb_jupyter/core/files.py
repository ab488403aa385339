"""Private files no other account can redirect: checked state directories, exclusive atomic writes, a safe
append-only opener.

Why: the state directory holds a user's tickets (and, briefly, keys). Another local account that can plant a
symlink or a file in it could make us write a ticket where it chooses. So a directory is used only when
``lstat`` shows a real directory (not a symlink), owned by this user, not writable by group or others; a
missing one is created 0700; a loose one is refused, never tightened (whatever was planted in it stays
untrusted). Files are written under a fresh ``mkstemp`` name (``O_CREAT|O_EXCL|O_NOFOLLOW``, 0600) and moved
into place with ``os.replace``, which replaces a planted symlink rather than following it. Root on the host
is trusted: nothing here defends against it.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, KerbJupyterError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def check_private_dir(path: Path, what: str = "state directory", *, create: bool = True,
                      error: type[KerbJupyterError] = ConfigError) -> Path:
    """Make sure ``path`` is a directory only this user can change; create it 0700 when absent.

    Raises ``error`` (ConfigError by default, code ``unsafe_directory``) naming the directory and what is wrong.
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise error(f"the {what} {path} does not exist", code="unsafe_directory") from None
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # another process made it meanwhile: checked below like any existing directory
        except OSError as err:
            raise error(f"cannot create the {what} {path}: {err.strerror}", code="unsafe_directory") from None
        st = os.lstat(path)
    except OSError as err:
        raise error(f"cannot inspect the {what} {path}: {err.strerror}", code="unsafe_directory") from None
    problem = _dir_problem(st)
    if problem:
        raise error(f"the {what} {path} {problem}: refusing to use it (make it a directory of your own, mode 0700)",
                    code="unsafe_directory")
    return path


def _dir_problem(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = {0o022: "group and others", 0o020: "its group"}.get(mode & 0o022, "others")
        return f"is writable by {who} (mode {mode:o})"
    return ""


@contextmanager
def private_temp(directory: Path, prefix: str) -> Iterator[Path]:
    """A new empty 0600 file with an unpredictable name in ``directory`` (already checked), removed on exit
    unless it was moved away. Raises OSError."""
    fd, name = tempfile.mkstemp(prefix=prefix, dir=directory)  # O_CREAT|O_EXCL|O_NOFOLLOW, 0600
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def write_private(path: Path, data: bytes, what: str = "state directory",
                  error: type[KerbJupyterError] = ConfigError) -> None:
    """Write ``data`` to ``path`` atomically as a 0600 file of this user.

    The directory is checked first (raises ``error``); writing raises OSError."""
    path = Path(path)
    directory = check_private_dir(path.parent, what, error=error)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(name, path)  # atomic: a reader sees the old file or the new one, never a part
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def open_append(path: Path) -> int:
    """An ``O_APPEND`` descriptor on a regular file of this user (created 0600 when absent).

    Refuses a symlink, anything not a regular file, a file owned by another user, one writable by others or
    with other hard links: raises OSError whose ``strerror`` says which. The caller closes the descriptor."""
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link; refusing to follow it", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        problem = ""
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_uid != os.geteuid():
            problem = f"it belongs to uid {st.st_uid}, not to this user"
        elif stat.S_IMODE(st.st_mode) & 0o022:
            problem = f"it is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
        elif st.st_nlink != 1:
            problem = f"it has {st.st_nlink} hard links"
        if problem:
            raise OSError(errno.EPERM, problem, str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_leftovers(directory: Path, prefix: str) -> list[str]:
    """Remove regular files of ours named ``prefix*`` in ``directory`` (what a killed process left behind).

    Returns the names removed; symlinks and other users' files are left alone (and never followed)."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            continue
    return removed
