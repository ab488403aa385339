"""The ticket keeper: an asyncio task that keeps one principal's TGT valid in the shared FILE cache.

Each ``step`` (run in a thread: Kerberos calls block) looks at the cache and decides: acquire from the
source, renew, or nothing; then it says how long to sleep. Renewal happens at ``renew_fraction`` of the
lifetime (with jitter) but always early enough for two more attempts before expiry. Failures retry
with a capped exponential backoff starting at ``retry_interval``; rejected credentials (wrong password,
disabled account, keytab for someone else) stop the retries so an AD account is never locked out.
The snapshot is also written to ``state.json`` next to the cache, for kernels to read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import files, tickets
from .errors import (
    CacheError,
    ConfigError,
    CredentialsRejectedError,
    IdentityError,
    KerbJupyterError,
    NoTicketError,
    SourceError,
)
from .sources import Source
from .tickets import TicketInfo

log = logging.getLogger(__name__)

SKEW_WARNING = 60.0  # seconds between our clock and the KDC's before we say so


@dataclass
class KeeperState:
    state: str = "starting"  # starting | valid | retrying | expired | error | stopped
    principal: str | None = None
    identity: dict[str, Any] | None = None
    source: str | None = None
    expires_at: float | None = None
    renew_until: float | None = None
    last_renewal: float | None = None
    last_renewal_kind: str | None = None
    next_attempt: float | None = None
    last_error: dict[str, str] | None = None
    consecutive_failures: int = 0
    renewals: int = 0
    acquisitions: int = 0
    failures: int = 0
    cache: str | None = None
    clock_skew: float | None = None
    granted: dict[str, int] | None = None  # broker source: service principal -> its ticket's end time
    updated_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TicketKeeper:
    def __init__(
        self,
        principal: str | None,
        source: Source,
        cache: Path,
        state_file: Path | None = None,
        *,
        renew_fraction: float = 0.8,
        retry_interval: float = 60.0,
        max_retry_interval: float = 900.0,
        jitter: float = 0.05,
        lifetime: int | None = None,
        renew_life: int | None = None,
        identity: dict[str, Any] | None = None,
        resolve: Callable[[], tuple[dict[str, Any], str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``principal`` may be None when ``resolve`` (identity -> principal) supplies it on the first step."""
        if principal is None and resolve is None:
            raise ValueError("either a principal or a resolve function is required")
        if not 0.1 <= renew_fraction <= 0.95:
            raise ValueError("renew_fraction must be between 0.1 and 0.95")
        self.principal = principal
        self.source = source
        self.cache = Path(cache)
        self.state_file = state_file
        self.renew_fraction = renew_fraction
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.jitter = jitter
        self.lifetime = lifetime
        self.renew_life = renew_life
        self.clock = clock
        self.resolve = resolve
        self.state = KeeperState(principal=principal, identity=identity, source=source.describe(),
                                 cache=str(self.cache))
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- the decision, synchronous ----------------------------------------------------------------
    def step(self, force: bool = False) -> float:
        """Bring the cache up to date once (``force``: renew even if not due); returns seconds to sleep."""
        if self.principal is None:
            try:
                self._resolve()
            except IdentityError as err:
                return self._record_failure(err, None, fatal=err.code != "aws_unreachable")
        now = self.clock()
        info = self._current()
        try:
            if info is None or (info.expired(now) and not self._renewable(info, now)):
                info = self._acquire("acquired")
            elif force or now >= self._renew_at(info):
                info = self._refresh(info, now)
            else:
                self._record_ok(info, None)
        except (CredentialsRejectedError, ConfigError) as err:  # retrying cannot help: say so and wait
            return self._record_failure(err, info, fatal=True)
        except (KerbJupyterError, OSError) as err:
            return self._record_failure(err, info, fatal=False)
        delay = max(self._renew_at(info) - self.clock(), 0.05)
        self.state.next_attempt = self.clock() + delay
        self._save()
        return delay

    def _resolve(self) -> None:
        assert self.resolve is not None
        identity, principal = self.resolve()
        self.principal = self.state.principal = principal
        self.state.identity = identity
        log.info("kerb_jupyter: identity %s (from %s, %s) maps to %s", identity.get("name"), identity.get("source"),
                 "enforced by AWS" if identity.get("trusted") else "claimed", principal)

    def _current(self) -> TicketInfo | None:
        try:
            info = tickets.read_cache(self.cache, allow_expired=True)
        except NoTicketError:
            return None
        except CacheError as err:
            log.warning("kerb_jupyter: %s; replacing it with a fresh ticket", err)
            return None
        return info if info.principal == self.principal else None

    def _renewable(self, info: TicketInfo, now: float) -> bool:
        # The KDC accepts a renewal up to its clock skew (5 min) after expiry, never after renew_till.
        return info.renewable and info.renew_till > now and now - info.endtime < 240

    def _refresh(self, info: TicketInfo, now: float) -> TicketInfo:
        life = max(info.endtime - info.starttime, 1)
        near_limit = info.renew_till - info.endtime < 0.5 * life
        if self.source.can_acquire and (near_limit or not self._renewable(info, now)):
            return self._acquire("reacquired")
        if self._renewable(info, now):
            new = tickets.renew(self.cache)
            self.state.renewals += 1
            self._record_ok(new, "renewed")
            log.info("kerb_jupyter: renewed the ticket for %s, valid until %s", self.principal, _fmt(new.endtime))
            return new
        raise SourceError(
            f"the ticket for {self.principal} cannot be renewed past {_fmt(info.renew_till)} and the "
            f"{self.source.kind} source cannot get a new one: run kinit again", code="renew_limit",
        )

    def _acquire(self, kind: str) -> TicketInfo:
        assert self.principal is not None  # resolved before any ticket work
        before = self.clock()
        info = self.source.acquire(self.principal, self.cache, self.lifetime, self.renew_life)
        self.state.acquisitions += 1
        skew = info.starttime - before
        self.state.clock_skew = skew if abs(skew) > 1 else 0.0
        if abs(skew) > SKEW_WARNING:
            log.warning("kerb_jupyter: this machine's clock differs from the KDC's by %.0f s; Kerberos "
                        "fails beyond 300 s: check NTP", skew)
        self._record_ok(info, kind)
        log.info("kerb_jupyter: %s a ticket for %s from %s, valid until %s", kind, self.principal,
                 self.source.describe(), _fmt(info.endtime))
        return info

    def _renew_at(self, info: TicketInfo) -> float:
        life = max(info.endtime - info.starttime, 1)
        # Jitter spreads many servers' renewals; seeded by the ticket so every call agrees on the moment.
        at = info.starttime + life * self.renew_fraction + random.Random(info.starttime).uniform(-self.jitter, 0) * life
        # Leave room for at least two more attempts before the ticket expires.
        latest = info.endtime - 2 * min(self.retry_interval, life / 4)
        return min(at, latest)

    def _record_ok(self, info: TicketInfo, kind: str | None) -> None:
        s = self.state
        s.state, s.expires_at, s.renew_until = "valid", float(info.endtime), float(info.renew_till)
        s.consecutive_failures, s.last_error = 0, None
        s.granted = dict(info.services) or None
        if kind:
            s.last_renewal, s.last_renewal_kind = self.clock(), kind

    def _record_failure(self, err: Exception, info: TicketInfo | None, fatal: bool) -> float:
        s = self.state
        s.failures += 1
        s.consecutive_failures += 1
        code = getattr(err, "code", "os_error")
        s.last_error = {"code": code, "message": str(err) if isinstance(err, KerbJupyterError)
                        else f"{type(err).__name__}: {getattr(err, 'strerror', '') or 'I/O error'}",
                        "at": _fmt(self.clock())}
        now = self.clock()
        if info is not None:
            s.expires_at, s.renew_until = float(info.endtime), float(info.renew_till)
        expired = info is None or info.expired(now)
        if fatal:
            s.state, s.next_attempt = "error", None
            log.error("kerb_jupyter: %s; not retrying until the configuration changes or a renewal is "
                      "requested", err)
            self._save()
            return float("inf")
        delay = float(min(self.retry_interval * 2 ** (s.consecutive_failures - 1), self.max_retry_interval))
        if info is not None and not expired:
            # Never sleep past the point where the remaining attempts would land after expiry.
            delay = min(delay, max((info.endtime - now) / 3, 1.0))
        delay *= 1 + random.uniform(0, self.jitter)
        s.state = "expired" if expired else "retrying"
        s.next_attempt = now + delay
        (log.error if expired else log.warning)("kerb_jupyter: %s; retrying in %.1f s", err, delay)
        self._save()
        return delay

    def _save(self) -> None:
        self.state.updated_at = self.clock()
        if self.state_file is None:
            return
        # A fresh 0600 file under an unpredictable name in the checked state directory, renamed into place. The
        # snapshot is a copy for kernels: failing to write it is logged, never fatal (the state says why anyway).
        try:
            files.write_private(self.state_file, json.dumps(self.state.as_dict()).encode())
        except (KerbJupyterError, OSError) as err:
            log.warning("kerb_jupyter: cannot write the state file %s: %s", self.state_file,
                        err if isinstance(err, KerbJupyterError) else err.strerror)

    # -- the loop -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="kerb_jupyter keeper")

    async def _run(self) -> None:
        while True:
            async with self._lock:
                delay = await asyncio.to_thread(self.step)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=None if delay == float("inf") else delay)
            except asyncio.TimeoutError:
                pass

    async def renew_now(self) -> KeeperState:
        """Renew (or re-acquire) at once, also after a fatal error; returns the new state."""
        async with self._lock:
            await asyncio.to_thread(self.step, True)
        self._wake.set()
        return self.state

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.state.state = "stopped" if self.state.state != "error" else self.state.state
        self.state.next_attempt = None


def _fmt(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
