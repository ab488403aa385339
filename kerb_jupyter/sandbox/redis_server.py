"""A private redis-server on 127.0.0.1 (no persistence, optional TLS and AUTH) for the broker's tests and benchmark."""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from pathlib import Path

from ..errors import SandboxError
from .procs import find_binary, free_port, port_is_free, tail, wait_for_port

REDIS_PACKAGES = "redis-server"


class RedisServer:
    """One redis-server in the foreground, state in ``root``; ``stop()`` then ``start()`` keeps the same port.

    With ``tls=(cert, key)`` it serves TLS only on ``port``; with ``password`` it requires AUTH.
    """

    def __init__(self, root: Path, port: int = 0, password: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.root = Path(root).resolve()
        self.port = port
        self.password = password
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.root / "redis.log"

    @property
    def url(self) -> str:
        """The URL a client uses (with the password, so never log it)."""
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        elif not _wait_free(self.port, 5):
            raise SandboxError(f"port 127.0.0.1:{self.port} for redis-server is already in use")
        conf = self.root / "redis.conf"
        conf.touch(0o600)
        conf.write_text(self._config())
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen([find_binary("redis-server", REDIS_PACKAGES), str(conf)], cwd=self.root,
                                         stdout=log, stderr=log, start_new_session=True)
        if not wait_for_port(self.port, self.proc, timeout=10):
            text = tail(self.log_file.read_text(errors="replace"))
            self.stop()
            raise SandboxError(f"redis-server did not start on 127.0.0.1:{self.port}: {text}")
        return self

    def _config(self) -> str:
        lines = [
            "bind 127.0.0.1",
            "protected-mode yes",
            "daemonize no",
            'save ""',
            "appendonly no",
            f"dir {self.root}",
            "logfile \"\"",
            "loglevel notice",
        ]
        if self.tls:
            cert, key = self.tls
            lines += ["port 0", f"tls-port {self.port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                      "tls-auth-clients no"]
        else:
            lines.append(f"port {self.port}")
        if self.password:
            lines.append(f"requirepass {self.password}")
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def random_password() -> str:
    return secrets.token_urlsafe(24)


def _wait_free(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not port_is_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
