"""Small process helpers for the sandbox: finding daemons, free ports, starting and stopping a listener."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from ..core.errors import SandboxError

_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_binary(name: str, packages: str) -> str:
    """Absolute path of a daemon or tool, or a SandboxError naming the Debian packages to install."""
    extra = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_pg_version, reverse=True)
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN, *extra])
    found = shutil.which(name, path=path)
    if found is None:
        raise SandboxError(
            f"{name} is not installed: install the Debian packages {packages} "
            "(scripts/setup does this: sudo bash scripts/setup)"
        )
    return found


def _pg_version(path: str) -> int:
    try:
        return int(path.split("/")[-2])
    except ValueError:
        return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (also checked free for UDP)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port_is_free(port):
            return port
    raise SandboxError("could not find a free port on 127.0.0.1")


def claim_port(port: int, what: str, wait: float = 0) -> int:
    """``port`` (0: a free one) for ``what``; a SandboxError if something still holds it after ``wait`` seconds."""
    if not port:
        return free_port()
    if not wait_port_free(port, wait):
        raise SandboxError(f"port 127.0.0.1:{port} for {what} is already in use: "
                           "is another sandbox running? Stop it or choose another port")
    return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on host:port (TCP) nor holds it (UDP); TIME_WAIT leftovers do not count."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float, host: str = "127.0.0.1") -> bool:
    """True once something accepts TCP connections on host:port; False if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def wait_port_free(port: int, timeout: float) -> bool:
    """True once 127.0.0.1:port is free (a stopped daemon has let go of it); False if time runs out."""
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_daemon(name: str, cmd: Sequence[str], port: int, log_file: Path, *, timeout: float = 10,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 own_logs: Sequence[Path] = ()) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (output appended to ``log_file``) and wait until it listens on ``port``.

    If it dies or does not listen within ``timeout`` seconds it is stopped and a SandboxError names the daemon,
    the port, its logs (``own_logs``: files the daemon writes itself, then ``log_file``) and their last lines.
    """
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=None if env is None else dict(env),
                                cwd=cwd, start_new_session=True)
    if wait_for_port(port, proc, timeout):
        return proc
    logs = (*own_logs, log_file)
    text = tail("".join(read_log(path) for path in logs))
    stop_process(proc)
    raise SandboxError(f"{name} did not start on 127.0.0.1:{port} (log {', '.join(map(str, logs))}): {text}")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10, group: bool = False) -> None:
    """SIGTERM (to its whole process group with ``group``), then SIGKILL if it has not exited within ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(5)


def alive(proc: subprocess.Popen[bytes] | None) -> bool:
    """The process was started and has not exited."""
    return proc is not None and proc.poll() is None


class Lifecycle:
    """``start()`` runs ``_start()`` and stops what it started if that fails; a context manager."""

    def start(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Daemon:
    """A daemon we start (``self.proc``, from ``start_daemon``): ``stop()`` ends it, ``running`` says if it runs."""

    proc: subprocess.Popen[bytes] | None = None
    stop_timeout: float = 10
    stop_group = False  # SIGTERM its whole process group

    @property
    def running(self) -> bool:
        return alive(self.proc)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, self.stop_timeout, self.stop_group)


def read_log(path: Path) -> str:
    """A log file's text, or "" if it is not there (yet)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def tail(text: str, lines: int = 12) -> str:
    """The last lines of a daemon's output, for error messages."""
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
