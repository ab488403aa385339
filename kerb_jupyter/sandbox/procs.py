"""Small process helpers for the sandbox: finding daemons, free ports, waiting for a listener."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time

from ..errors import SandboxError

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


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (TCP) nor holds it (UDP); TIME_WAIT leftovers do not count."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """True once something accepts TCP connections on 127.0.0.1:port; False if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def tail(text: str, lines: int = 12) -> str:
    """The last lines of a daemon's output, for error messages."""
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else "(no output)"
