"""Issuing: S4U2Self for the user, then S4U2Proxy to each granted cluster on its own; a cache of what was issued.

The broker's own TGT and the evidence (S4U2Self) ticket stay inside the broker: the cache handed out holds one
service ticket per issued cluster, stored under the service's full realm (python-gssapi leaves it empty, and libpq
then misses it wherever krb5.conf maps the host to a realm), with the evidence ticket that MIT copies into
each proxy ticket's ``second_ticket`` removed. The lifetime cap goes to ``SecurityContext(lifetime=...)``:
MIT ignores the one given to ``impersonate()``. Blocking: the broker calls ``issue`` from a thread.

    issued = Issuer("broker/host@CORP.EXAMPLE.COM", Path("/etc/broker.keytab")).issue(
        "alice", {"analytics": "postgres/db.corp.example.com"}, 3600)   # names without @REALM get the broker's
    issued.clusters   # {"analytics": <end time>} for each cluster the KDC issued
    issued.refused    # {"finance": Refusal("service_not_allowed", "...")} for each one it refused

A KDC refusal is answered per cluster (``Issued.refused``), never by an exception: the KDC error code decides
the reason through ``kdcerrors.KDC_ERRORS``, where every code is either a permanent refusal or an outage the
notebook may retry (``OUTAGES``). An unknown code is a permanent ``kdc_refused``: never a 503 retried forever.

Delegation refusals (``KDC_ERR_BADOPTION`` from Windows and MIT, ``KDC_ERR_POLICY`` from Samba) do not say
whose fault they are. The evidence ticket does: the KDC makes it forwardable only when the broker is trusted
for protocol transition AND the user may be delegated. Forwardable evidence -> the service is not in the
broker's delegation list; otherwise the broker impersonates again the last user it got forwardable evidence for
(itself it cannot: MIT's and Samba's KDCs refuse that with KDC_ERR_PADATA_TYPE_NOSUPP): forwardable -> this user
cannot be delegated (NOT_DELEGATED, Protected Users), not -> the broker is not trusted. With no such user since
start-up the reason is ``broker_not_trusted`` and the message names both possible causes.

Raises (outages, the whole request): KdcUnreachableError, CredentialsRejectedError (the broker's own key),
TicketError (``broker_ticket``, ``clock_skew``, ``invalid_request``), IdentityError (``invalid_request``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import gssapi
import krb5
from gssapi.raw.misc import GSSError

from ..core.errors import CredentialsRejectedError, IdentityError, KdcUnreachableError, TicketError
from ..core.tickets import KDC_UNREACHABLE
from .ccache import build_cache, rewrite_creds
from .kdcerrors import (
    BROKER_KEY,
    BROKER_NOT_TRUSTED,
    BROKER_TICKET,
    DELEGATION,
    KDC_REFUSED,
    KDC_UNAVAILABLE,
    OUTAGES,
    SERVICE_NOT_ALLOWED,
    USER_NOT_DELEGABLE,
    kdc_error,
    refusal_message,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Refusal:
    """A cluster the KDC would not issue: ``reason`` (above) and a one-line ``message`` naming what to change."""

    reason: str
    message: str
    kdc_code: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message}


@dataclass(frozen=True)
class Issued:
    principal: str
    cache: bytes  # a FILE credential cache (format 0x0504); no credentials when nothing was issued
    clusters: dict[str, int]  # cluster name -> end time of its ticket (Unix seconds)
    timings: dict[str, float]  # seconds: "s4u2self", then "proxy:<cluster>"
    refused: dict[str, Refusal] = field(default_factory=dict)  # cluster name -> why the KDC refused it


class Issuer:
    """Acts for users with the broker's keytab; one instance per process (thread-safe)."""

    def __init__(self, service_principal: str, keytab: Path) -> None:
        self.service_principal = service_principal
        self.keytab = Path(keytab)
        self._life = 10 * 3600  # lowered to the KDC's maximum the first time the KDC grants less
        self._tgt: krb5.Creds | None = None  # the broker's own TGT, reused for a tenth of its life
        self._tgt_lock = threading.Lock()
        self._counter = 0
        self._lock = threading.Lock()
        self._delegable: str | None = None  # the last user whose evidence ticket was forwardable

    def issue(self, principal: str, clusters: dict[str, str], lifetime: int) -> Issued:
        """Service tickets for ``principal`` to each ``clusters`` SPN, valid at most ``lifetime`` seconds.

        Each cluster is issued or refused on its own (``Issued.refused``). Raises only for an outage or a bad
        request: KdcUnreachableError, CredentialsRejectedError (the broker's key), TicketError, IdentityError.
        """
        realm = self.service_principal.rpartition("@")[2] if "@" in self.service_principal else _default_realm()
        principal = qualify(principal, realm)
        if "/" in principal.rpartition("@")[0]:
            raise IdentityError(f"refusing to act for {principal!r}: only user principals", code="invalid_request")
        spns = {name: qualify(spn, realm) for name, spn in clusters.items()}
        if not spns or lifetime <= 0:
            raise TicketError("issuing needs at least one service and a positive lifetime", code="invalid_request")
        ctx = krb5.init_context()
        cc, user_cc = self._memory_cache(ctx), self._memory_cache(ctx)
        timings: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            lifetime = min(lifetime, self._own_tgt(ctx, cc[0]))
            svc = self._broker_gss(lambda: gssapi.Credentials(
                name=gssapi.Name(self.service_principal, gssapi.NameType.kerberos_principal), usage="initiate",
                store={b"ccache": cc[1]}))
            try:
                imp = svc.impersonate(gssapi.Name(principal, gssapi.NameType.kerberos_principal), usage="initiate")
            except GSSError as err:
                refusal = self._refusal(err, principal, None)
                return Issued(principal, build_cache(principal, []), {}, timings, dict.fromkeys(spns, refusal))
            timings["s4u2self"] = time.perf_counter() - t0
            refused = self._proxies(imp, principal, spns, lifetime, timings)
            # MIT keeps the evidence and proxy tickets with the impersonated credential: store it to read them.
            imp.store(store={b"ccache": user_cc[1]}, overwrite=True)
            if _forwardable(user_cc[0], principal, self.service_principal):
                self._delegable = principal
            if any(r.reason == DELEGATION for r in refused.values()):
                refused = self._tell_apart(ctx, svc, user_cc[0], principal, spns, refused)
            return self._export(ctx, [cc[0], user_cc[0]], principal, spns, timings, refused)
        finally:
            for c in (cc[0], user_cc[0]):
                try:
                    krb5.cc_destroy(ctx, c)
                except krb5.Krb5Error:
                    pass

    def _proxies(self, imp: gssapi.Credentials, principal: str, spns: dict[str, str], lifetime: int,
                 timings: dict[str, float]) -> dict[str, Refusal]:
        """S4U2Proxy to each SPN in turn, a refusal of one not stopping the others; returns the refusals."""
        refused: dict[str, Refusal] = {}
        for cluster, spn in spns.items():
            t1 = time.perf_counter()
            try:
                gssapi.SecurityContext(name=gssapi.Name(spn, gssapi.NameType.kerberos_principal), creds=imp,
                                       usage="initiate", lifetime=lifetime).step()
            except GSSError as err:
                refused[cluster] = self._refusal(err, principal, spn)
            timings[f"proxy:{cluster}"] = time.perf_counter() - t1
        return refused

    def _memory_cache(self, ctx: krb5.Context) -> tuple[krb5.CCache, bytes]:
        with self._lock:
            self._counter += 1
            name = f"MEMORY:kerb-jupyter-broker-{os.getpid()}-{self._counter}".encode()
        return krb5.cc_resolve(ctx, name), name

    def _refusal(self, err: GSSError, principal: str, spn: str | None) -> Refusal:
        """The KDC's answer to S4U2Self (``spn`` None) or to S4U2Proxy towards ``spn``; raises for an outage."""
        minor = err.min_code - (1 << 32) if err.min_code >= 1 << 31 else err.min_code
        name, reason = kdc_error(minor, spn is None)
        text = " ".join(str(err).split())[:200]
        step = f"S4U2Self for {principal}" if spn is None else f"S4U2Proxy for {principal} to {spn}"
        if reason in OUTAGES:
            if reason == BROKER_TICKET:
                with self._tgt_lock:
                    self._tgt = None
            if reason == KDC_UNAVAILABLE:
                raise KdcUnreachableError(f"{step}: the broker cannot reach the KDC ({name})")
            if reason == BROKER_KEY:
                raise CredentialsRejectedError(f"{step}: the KDC refused the broker's key from {self.keytab} "
                                               f"({name}); export the keytab again")
            raise TicketError(f"{step}: {name}, retry later", code=reason)
        return Refusal(reason, refusal_message(reason, principal, self.service_principal, spn, name, text), name)

    def _tell_apart(self, ctx: krb5.Context, svc: gssapi.Credentials, user_cc: krb5.CCache, principal: str,
                    spns: dict[str, str], refused: dict[str, Refusal]) -> dict[str, Refusal]:
        """Delegation refusals -> service_not_allowed, user_not_delegable or broker_not_trusted (module docstring)."""
        trusted: bool | None = True
        if _forwardable(user_cc, principal, self.service_principal):
            reason = SERVICE_NOT_ALLOWED
        else:
            trusted = None  # impersonating itself is refused (KDC_ERR_PADATA_TYPE_NOSUPP: MIT and Samba KDCs)
            if self._delegable not in (None, principal):
                trusted = self._trusted(ctx, svc, str(self._delegable))
            reason = USER_NOT_DELEGABLE if trusted else BROKER_NOT_TRUSTED
        out = dict(refused)
        for cluster, r in refused.items():
            if r.reason == DELEGATION:
                message = refusal_message(reason, principal, self.service_principal, spns[cluster], r.kdc_code, "")
                if trusted is None:
                    message += f", or the user {principal} cannot be delegated (the KDC does not say which)"
                out[cluster] = Refusal(reason, message, r.kdc_code)
        return out

    def _trusted(self, ctx: krb5.Context, svc: gssapi.Credentials, probe: str) -> bool | None:
        """Whether the KDC trusts the broker for protocol transition, by impersonating ``probe`` (a principal that
        may be delegated): its evidence ticket is forwardable only if so. None when the KDC refuses the probe."""
        cc = self._memory_cache(ctx)
        try:
            me = svc.impersonate(gssapi.Name(probe, gssapi.NameType.kerberos_principal), usage="initiate")
            me.store(store={b"ccache": cc[1]}, overwrite=True)
            return _forwardable(cc[0], probe, self.service_principal)
        except GSSError:
            return None
        finally:
            try:
                krb5.cc_destroy(ctx, cc[0])
            except krb5.Krb5Error:
                pass

    def _own_tgt(self, ctx: krb5.Context, cc: krb5.CCache) -> int:
        """The broker's TGT, NOT renewable, into ``cc``; returns the seconds it has left.

        The KDC copies a TGT's renewable flag into every ticket got with it: proxy tickets from a renewable TGT
        could be renewed for days by whoever holds them, past the policy's cap. MIT clients ask for
        RENEWABLE_OK, which turns a request longer than the KDC allows into a renewable ticket: so ask again
        for no more than the KDC granted, and remember that.
        """
        now = time.time()
        with self._tgt_lock:
            creds = self._tgt
            if creds is None or creds.times.endtime - now < 0.9 * (creds.times.endtime - creds.times.authtime):
                creds = self._tgt = self._fetch_tgt(ctx)
        try:
            krb5.cc_initialize(ctx, cc, creds.client)
            krb5.cc_store_cred(ctx, cc, creds)
        except krb5.Krb5Error as err:
            raise TicketError(f"the broker could not use its own ticket: {err}") from None
        return int(creds.times.endtime - now)

    def _fetch_tgt(self, ctx: krb5.Context) -> krb5.Creds:
        try:
            client = krb5.parse_name_flags(ctx, self.service_principal.encode())
            keytab = krb5.kt_resolve(ctx, f"FILE:{self.keytab}".encode())
            for _ in range(2):
                opt = krb5.get_init_creds_opt_alloc(ctx)
                krb5.get_init_creds_opt_set_renew_life(opt, 0)
                krb5.get_init_creds_opt_set_tkt_life(opt, self._life)
                krb5.get_init_creds_opt_set_forwardable(opt, True)
                creds = krb5.get_init_creds_keytab(ctx, client, opt, keytab=keytab)
                life = creds.times.endtime - (creds.times.starttime or creds.times.authtime)
                if not creds.ticket_flags & krb5.TicketFlags.renewable:
                    break
                self._life = max(life - 5, 60)
            else:
                raise TicketError("the KDC gives the broker only renewable tickets", code="renewable_tgt")
        except krb5.Krb5Error as err:
            if err.err_code in KDC_UNREACHABLE:
                raise KdcUnreachableError("the broker's own ticket: the broker cannot reach the KDC") from None
            raise CredentialsRejectedError(f"the broker's own ticket from {self.keytab}: {err}") from None
        return creds

    def _broker_gss(self, call: Callable[[], T]) -> T:
        """A GSSAPI call with the broker's own credentials; any failure is the broker's (503)."""
        try:
            return call()
        except GSSError as err:
            minor = err.min_code - (1 << 32) if err.min_code >= 1 << 31 else err.min_code
            if kdc_error(minor, True)[1] == KDC_UNAVAILABLE:
                raise KdcUnreachableError("the broker's own ticket: the broker cannot reach the KDC") from None
            raise CredentialsRejectedError(f"the broker's own ticket: {' '.join(str(err).split())[:160]}") from None

    def _export(self, ctx: krb5.Context, caches: list[krb5.CCache], principal: str, clusters: dict[str, str],
                timings: dict[str, float], refused: dict[str, Refusal]) -> Issued:
        wanted = {spn_key(spn): (name, spn) for name, spn in clusters.items() if name not in refused}
        found: dict[str, tuple[bytes, int]] = {}
        for creds in (c for cc in caches for c in cc):
            client = creds.client.name.decode() if creds.client.name else ""
            server = creds.server.name.decode() if creds.server.name else ""
            hit = wanted.get(spn_key(server))
            if client.lower() == principal.lower() and hit is not None:
                name, spn = hit
                found[name] = (rewrite_creds(krb5.marshal_credentials(ctx, creds), spn), creds.times.endtime)
        refused = dict(refused)
        for name in sorted(set(clusters) - set(found) - set(refused)):  # "issued" without a ticket: never seen
            refused[name] = Refusal(KDC_REFUSED, f"the KDC gave no ticket for {clusters[name]} to {principal}")
        cache = build_cache(principal, [found[n][0] for n in sorted(found)])
        return Issued(principal, cache, {n: found[n][1] for n in sorted(found)}, timings, refused)


def _forwardable(cc: krb5.CCache, client: str, server: str) -> bool:
    """Whether ``cc`` holds a forwardable ticket from ``client`` to ``server`` (the S4U2Self evidence ticket)."""
    for creds in cc:
        c = creds.client.name.decode() if creds.client.name else ""
        s = creds.server.name.decode() if creds.server.name else ""
        if c.lower() == client.lower() and spn_key(s) == spn_key(server):
            return bool(creds.ticket_flags & krb5.TicketFlags.forwardable)
    return False


def spn_key(name: str) -> str:
    """``service/host`` without the realm, lower-case: proxy tickets may come back with an empty realm."""
    return name.rsplit("@", 1)[0].lower() if "@" in name else name.lower()


def qualify(name: str, realm: str) -> str:
    """``name`` with ``@realm`` added when it has none. Raises IdentityError (code invalid_request) if malformed."""
    base, at, r = name.partition("@")
    if not base or (at and not r) or "@" in r or any(c in name for c in "\0\n\r\t "):
        raise IdentityError(f"not a Kerberos principal: {name[:80]!r}", code="invalid_request")
    return name if at else f"{name}@{realm}"


def _default_realm() -> str:
    try:
        return str(krb5.get_default_realm(krb5.init_context()).decode())
    except krb5.Krb5Error:
        raise TicketError("no default realm in krb5.conf: give the broker's principal with its @REALM",
                          code="invalid_request") from None


__all__ = ["Issued", "Issuer", "Refusal", "qualify", "spn_key"]
