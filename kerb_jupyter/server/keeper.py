"""The ticket keeper: an asyncio task that keeps one principal's TGT valid in the shared FILE cache.

Each ``step`` (run in a thread: Kerberos calls block) looks at the cache and decides: acquire from the
source, renew, or nothing; then it says how long to sleep. Only a ticket that is still valid is renewed
(Active Directory refuses to renew an expired one): an expired ticket is re-acquired from the source at once.
Renewal happens at ``renew_fraction`` of the lifetime (with jitter) but always early enough for two more
attempts before expiry. Failures retry on the schedule of ``pacing.retry_delay``; rejected credentials (wrong
password, disabled account, keytab for someone else) stop the retries so an AD account is never locked out,
and a manual renewal is then held for ``rejected_cooldown`` unless the credential source changes. Whatever
goes wrong becomes an ``error`` state: the task never dies. The snapshot is also written to ``state.json``.
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

from ..core import files, tickets
from ..core.errors import (
    CacheError,
    ConfigError,
    CredentialsRejectedError,
    IdentityError,
    KerbJupyterError,
    NoTicketError,
    SourceError,
    TicketExpiredError,
)
from ..core.tickets import TicketInfo
from . import pacing
from .sources import SecretsManagerSource, Source
from .threads import in_daemon_thread

SKEW_WARNING = 60.0  # seconds between our clock and the KDC's before we say so
MIT_RENEW_GRACE = 240.0  # MIT accepts renewing an expired ticket within its clock skew (300 s); AD never does


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
    refused: dict[str, dict[str, str]] | None = None  # broker source: cluster -> {reason, message}
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
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        rejected_cooldown: float = 900.0,
    ) -> None:
        """``principal`` may be None when ``resolve`` (identity -> principal) supplies it on the first step.

        ``log``: where the keeper's lines go (the server extension passes its own logger, so they carry
        Jupyter's time, level and name). ``rejected_cooldown``: seconds a manual renewal stays refused after
        the KDC rejected the credentials, unless the credential source changes first.
        """
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
        self.log = log if log is not None else logging.getLogger(__name__)
        self.rejected_cooldown = rejected_cooldown
        self.state = KeeperState(principal=principal, identity=identity, source=source.describe(),
                                 cache=str(self.cache))
        self.state.source = self._describe_source()
        self._rejected: tuple[float, Any] | None = None  # (when, source stamp) of the last rejection
        self._task: asyncio.Task[None] | None = None
        self._manual_delay: float | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- the decision, synchronous ----------------------------------------------------------------
    def step(self, force: bool = False) -> float:
        """Bring the cache up to date once (``force``: renew even if not due); returns seconds to sleep.

        Never raises: whatever goes wrong, bad settings included, becomes a reported state."""
        try:
            return self._step(force)
        except Exception as err:  # the keeper must never die; the traceback goes to the log
            self.log.error("the ticket keeper hit an unexpected error", exc_info=True)
            wrapped = KerbJupyterError(f"unexpected error in the ticket keeper: {type(err).__name__}: "
                                       f"{str(err)[:200]}", code="internal_error")
            return self._record_failure(wrapped, None, fatal=True)

    def _step(self, force: bool) -> float:
        if self.principal is None:
            try:
                self._resolve()
            except ConfigError as err:
                return self._record_failure(err, None, fatal=True)
            except IdentityError as err:
                return self._record_failure(err, None, fatal=err.code != "aws_unreachable")
        now = self.clock()
        info = self._current()
        try:
            if info is None:
                info = self._acquire("acquired")
            elif info.expired(now):
                info = self._after_expiry(info, now)
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
        self._persist()
        return delay

    def _resolve(self) -> None:
        assert self.resolve is not None
        identity, principal = self.resolve()
        self.principal = self.state.principal = principal
        self.state.identity = identity
        self.state.source = self._describe_source()
        self.log.info("identity %s (from %s, %s) maps to %s", identity.get("name"), identity.get("source"),
                      "enforced by AWS" if identity.get("trusted") else "claimed", principal)

    def _describe_source(self) -> str:
        """The source as used: a Secrets Manager template shows the secret id it names for this principal."""
        text = self.source.describe()
        if isinstance(self.source, SecretsManagerSource) and self.principal:
            try:
                text = text.replace(self.source.secret_id, self.source.secret_name(self.principal))
            except ConfigError:
                pass  # a bad template is reported when the secret is fetched
        return text

    def _current(self) -> TicketInfo | None:
        try:
            info = tickets.read_cache(self.cache, allow_expired=True)
        except NoTicketError:
            return None
        except CacheError as err:
            self.log.warning("%s; replacing it with a fresh ticket", err)
            return None
        if info.principal != self.principal:
            self.log.warning(
                "the shared cache %s held a ticket for %s, not for %s (did someone run kinit into it?); "
                "putting a ticket for %s back", self.cache, info.principal, self.principal, self.principal)
            return None
        return info

    def _after_expiry(self, info: TicketInfo, now: float) -> TicketInfo:
        """An expired ticket: never renewed when the source can acquire (AD refuses: KRB5KDC_ERR_TKT_EXPIRED)."""
        if self.source.can_acquire:
            return self._acquire("reacquired")
        if info.renewable and info.renew_till > now and now - info.endtime < MIT_RENEW_GRACE:
            return self._renew(info)  # the last chance for a kinit cache: MIT accepts this within its skew
        raise SourceError(
            f"the ticket for {self.principal} expired at {_fmt(info.endtime)} and the {self.source.kind} "
            "source cannot get a new one: run kinit again", code="ticket_expired")

    def _refresh(self, info: TicketInfo, now: float) -> TicketInfo:
        """A ticket that is still valid: renew it, or re-acquire when renewal is impossible or nearly so."""
        life = max(info.endtime - info.starttime, 1)
        near_limit = info.renew_till - info.endtime < 0.5 * life
        renewable = info.renewable and info.renew_till > now
        if self.source.can_acquire and (near_limit or not renewable):
            return self._acquire("reacquired")
        if renewable:
            return self._renew(info)
        raise SourceError(
            f"the ticket for {self.principal} cannot be renewed past {_fmt(info.renew_till)} and the "
            f"{self.source.kind} source cannot get a new one: run kinit again", code="renew_limit",
        )

    def _renew(self, info: TicketInfo) -> TicketInfo:
        try:
            new = tickets.renew(self.cache)
        except TicketExpiredError:
            # The KDC says it has expired (its clock, or AD's rule): get a new one at once when we can.
            if not self.source.can_acquire:
                raise
            self.log.info("the KDC refused to renew the ticket for %s as expired; getting a new one", self.principal)
            return self._acquire("reacquired")
        self.state.renewals += 1
        self._record_ok(new, "renewed")
        self.log.info("renewed the ticket for %s, valid until %s", self.principal, _fmt(new.endtime))
        return new

    def _acquire(self, kind: str) -> TicketInfo:
        assert self.principal is not None  # resolved before any ticket work
        before = self.clock()
        info = self.source.acquire(self.principal, self.cache, self.lifetime, self.renew_life)
        self.state.acquisitions += 1
        skew = info.starttime - before
        self.state.clock_skew = skew if abs(skew) > 1 else 0.0
        if abs(skew) > SKEW_WARNING:
            self.log.warning("this machine's clock differs from the KDC's by %.0f s; Kerberos fails beyond "
                             "300 s: check NTP", skew)
        self._rejected = None
        self._record_ok(info, kind)
        self.log.info("%s a ticket for %s from %s, valid until %s", kind, self.principal, self._describe_source(),
                      _fmt(info.endtime))
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
        krb5_code = getattr(err, "krb5_code", None)
        if krb5_code is not None:
            s.last_error["krb5_code"] = str(krb5_code)
        detail = f" (krb5 error {krb5_code})" if krb5_code is not None else ""
        now = self.clock()
        if info is not None:
            s.expires_at, s.renew_until = float(info.endtime), float(info.renew_till)
        expired = info is None or info.expired(now)
        if fatal:
            s.state, s.next_attempt = "error", None
            if isinstance(err, CredentialsRejectedError):
                self._rejected = (now, self._source_stamp())
            self.log.error("%s%s; not retrying until the configuration changes or a renewal is requested",
                           err, detail)
            self._persist()
            return float("inf")
        delay = self.retry_delay(s.consecutive_failures, None if expired or info is None else info.endtime - now)
        s.state = "expired" if expired else "retrying"
        s.next_attempt = now + delay
        (self.log.error if expired else self.log.warning)("%s%s; retrying in %.1f s", err, detail, delay)
        self._persist()
        return delay

    def retry_delay(self, failures: int, time_left: float | None) -> float:
        """Seconds before retry number ``failures``; see ``pacing.retry_delay``."""
        return pacing.retry_delay(failures, time_left, self.retry_interval, self.max_retry_interval, self.jitter)

    # -- manual renewal after rejected credentials ------------------------------------------------
    def _source_stamp(self) -> Any:
        return pacing.source_stamp(self.source, self.principal)

    def renewal_hold(self) -> float:
        """Seconds a manual renewal stays refused after rejected credentials (0: go ahead). Blocks (AWS)."""
        if self._rejected is None or (self.state.last_error or {}).get("code") != "credentials_rejected":
            return 0.0
        when, stamp = self._rejected
        left = when + self.rejected_cooldown - self.clock()
        if left <= 0 or (stamp is not None and self._source_stamp() != stamp):
            return 0.0
        return left

    def _persist(self) -> None:
        """Write state.json; a state directory that cannot be used is reported, never fatal to the keeper."""
        self.state.refused = getattr(self.source, "refused", None) or None  # the broker's last per-cluster refusals
        try:
            self._save()
        except (KerbJupyterError, OSError) as err:
            message = str(err) if isinstance(err, KerbJupyterError) else f"{err.strerror}: {err.filename}"
            self.state.state, self.state.next_attempt = "error", None
            self.state.last_error = {"code": getattr(err, "code", "os_error"), "message": message,
                                     "at": _fmt(self.clock())}
            self.log.error("cannot write the keeper's state file: %s", message)

    def _save(self) -> None:
        self.state.updated_at = self.clock()
        if self.state_file is None:
            return
        # A fresh 0600 file under an unpredictable name in the checked state directory, renamed into place.
        # Raises; ``_persist`` reports a failure as the keeper's error state without stopping the keeper.
        files.write_private(self.state_file, json.dumps(self.state.as_dict()).encode())

    # -- the loop -------------------------------------------------------------------------------------
    def start(self, delay: float | None = None) -> None:
        """Run the loop; its first step at once, or after ``delay`` seconds (a step was just made)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(delay), name="kerb_jupyter keeper")

    async def start_now(self) -> KeeperState:
        """Make the first step here (one attempt, its outcome returned), then run the loop."""
        async with self._lock:
            delay = await in_daemon_thread(self.step, name="kerb-jupyter-keeper")
        self.start(delay)
        return self.state

    async def _run(self, delay: float | None = None) -> None:
        while True:
            if delay is None:
                async with self._lock:
                    delay = await in_daemon_thread(self.step, name="kerb-jupyter-keeper")  # never raises
            self._wake.clear()
            # Woken by renew_now, which just made an attempt: sleep as it decided, never a second attempt right
            # away (after rejected credentials that would be a second AS request towards an AD lockout).
            delay = self._manual_delay if await self._sleep(delay) else None

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds or until woken (True). Not ``wait_for``: on Python < 3.12 it can swallow a
        cancellation that arrives as the wake-up does, and stop() would then wait for ever."""
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait({waiter}, timeout=None if delay == float("inf") else delay)
        finally:
            waiter.cancel()
        return bool(done)

    async def renew_now(self) -> KeeperState:
        """Renew (or re-acquire) at once, also after a fatal error; returns the new state.

        After rejected credentials, check ``held()`` first: this method always makes its attempt."""
        async with self._lock:
            self._manual_delay = await in_daemon_thread(self.step, True, name="kerb-jupyter-keeper")
        self._wake.set()
        return self.state

    async def held(self) -> float:
        """``renewal_hold()`` without blocking the event loop."""
        async with self._lock:
            return await in_daemon_thread(self.renewal_hold)

    async def stop(self) -> None:
        """Cancel the task; never raises, whatever state the keeper (or its task) is in."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=10)  # never hangs a shutdown, whatever the task does
            if not task.done():
                self.log.warning("the ticket keeper's task did not stop; leaving it")
            elif not task.cancelled() and task.exception() is not None:  # stopping must succeed all the same
                self.log.error("the ticket keeper's task had failed", exc_info=task.exception())
        self.state.state = "stopped" if self.state.state != "error" else self.state.state
        self.state.next_attempt = None


def _fmt(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
