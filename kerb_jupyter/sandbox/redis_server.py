"""A private redis-server on 127.0.0.1 (no persistence, optional TLS and AUTH) for the broker's tests and benchmark."""

from __future__ import annotations

import secrets
from pathlib import Path

from .procs import Daemon, alive, claim_port, find_binary, start_daemon

REDIS_PACKAGES = "redis-server"


class RedisServer(Daemon):
    """One redis-server in the foreground, state in ``root``; ``stop()`` then ``start()`` keeps the same port.

    With ``tls=(cert, key)`` it serves TLS only on ``port``; with ``password`` it requires AUTH.
    """

    def __init__(self, root: Path, port: int = 0, password: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.root = Path(root).resolve()
        self.port = port
        self.password = password
        self.tls = tls
        self.log_file = self.root / "redis.log"

    @property
    def url(self) -> str:
        """The URL a client uses (with the password, so never log it)."""
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if alive(self.proc):
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = claim_port(self.port, "redis-server", wait=5)
        conf = self.root / "redis.conf"
        conf.touch(0o600)
        conf.write_text(self._config())
        self.proc = start_daemon("redis-server", [find_binary("redis-server", REDIS_PACKAGES), str(conf)], self.port,
                                 self.log_file, cwd=self.root)
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

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def random_password() -> str:
    return secrets.token_urlsafe(24)
