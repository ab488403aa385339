"""The broker's audit log: one JSON line per request; its own log names each outage of a dependency once."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core import files
from ..core.errors import ConfigError

log = logging.getLogger(__name__)

FIELDS = ("time", "request_id", "caller_arn", "source", "principal", "clusters", "decision", "reason")


class AuditLog:
    """Appends whole lines to a private file (0600, O_APPEND, no symlinks: ``files.open_append``); without a
    file, records go to the logger."""

    def __init__(self, path: Path | None) -> None:
        """Raises ConfigError when ``path`` cannot be this user's private log file."""
        self.path = path
        self._lock = threading.Lock()
        if path is not None:
            try:  # at start-up: a symlink or someone else's file is refused before the broker listens
                os.close(files.open_append(path))
            except OSError as err:
                raise ConfigError(f"audit_log {path}: {err.strerror}") from None

    def record(self, *, request_id: str, source: str, decision: str, reason: str, caller_arn: str | None = None,
               principal: str | None = None, clusters: list[str] | None = None, **extra: Any) -> dict[str, Any]:
        """Write one record; raises OSError when the file cannot be written (the caller refuses the request)."""
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "request_id": request_id,
            "caller_arn": caller_arn, "source": source, "principal": principal, "clusters": clusters or [],
            "decision": decision, "reason": reason, **extra,
        }
        line = json.dumps(doc, ensure_ascii=True, default=str) + "\n"
        if self.path is None:
            log.info("broker audit: %s", line.rstrip())
            return doc
        with self._lock:
            fd = files.open_append(self.path)  # never through a symlink planted since start-up
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        return doc


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of an audit file (for tests and tools)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Refusals caused by a dependency being down (not by the caller): logged once per outage, audited every time.
OUTAGES = {"store_unavailable": "the shared store", "sts_unavailable": "AWS STS",
           "ldap_unavailable": "the directory", "kdc_unreachable": "the KDC"}


class OutageLog:
    """One WARNING when a dependency starts failing, one INFO when it answers again; DEBUG for the refusals between."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: dict[str, float] = {}
        self._refused: dict[str, int] = {}

    def refused(self, reason: str, request_id: str, detail: str) -> None:
        """A request refused for ``reason`` (one of OUTAGES)."""
        self._refused[reason] = self._refused.get(reason, 0) + 1
        if reason in self._since:
            log.debug("broker: request %s refused (%s): %s", request_id, reason, detail)
            return
        self._since[reason] = self._clock()
        log.warning("broker: %s is unavailable (%s: %s); refusing requests with 503 %s until it answers again "
                    "(logged once per outage, every request is in the audit log)", OUTAGES[reason], reason, detail,
                    reason)

    def recovered(self, reason: str) -> None:
        """The dependency behind ``reason`` answered: ends its outage, if there was one."""
        since = self._since.pop(reason, None)
        if since is not None:
            log.info("broker: %s answers again after %.1f s; %d request(s) were refused (%s)", OUTAGES[reason],
                     self._clock() - since, self._refused.pop(reason, 0), reason)
