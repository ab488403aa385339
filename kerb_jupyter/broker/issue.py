"""Issuing: S4U2Self for the user, S4U2Proxy to each granted cluster, and a cache holding only those tickets.

The broker's own TGT and the evidence (S4U2Self) ticket stay inside the broker: the cache handed out holds one
service ticket per cluster, stored under the service's full realm (python-gssapi leaves it empty, and libpq
then misses it wherever krb5.conf maps the host to a realm), with the evidence ticket that MIT copies into
each proxy ticket's ``second_ticket`` removed. The lifetime cap goes to ``SecurityContext(lifetime=...)``:
MIT ignores the one given to ``impersonate()``. Blocking: the broker calls ``issue`` from a thread.

    issued = Issuer("broker/host@CORP.EXAMPLE.COM", Path("/etc/broker.keytab")).issue(
        "alice", {"analytics": "postgres/db.corp.example.com"}, 3600)   # names without @REALM get the broker's

Error codes: ``invalid_request`` (not a user principal, no service, lifetime <= 0), ``impersonation_not_allowed``
(the KDC refused S4U2Self: protocol transition), ``delegation_not_allowed`` (it refused S4U2Proxy to a service),
``unknown_principal``, ``service_unknown``, ``kdc_unreachable``, ``credentials_rejected`` (the broker's keytab).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gssapi
import krb5
from gssapi.raw.misc import GSSError

from ..errors import CredentialsRejectedError, IdentityError, KdcUnreachableError, TicketError
from ..tickets import KDC_UNREACHABLE


class DelegationRefused(TicketError):
    """The KDC will not let the broker act for this user (S4U2Self) or towards this service (S4U2Proxy)."""

    code = "delegation_not_allowed"


_KRB5 = -1765328384  # ERROR_TABLE_BASE_krb5 (signed), as GSSAPI's minor status and krb5's err_code carry it
_C_UNKNOWN, _S_UNKNOWN, _POLICY, _BADOPTION = (_KRB5 + n for n in (6, 7, 12, 13))


@dataclass(frozen=True)
class Issued:
    principal: str
    cache: bytes  # a FILE credential cache (format 0x0504)
    clusters: dict[str, int]  # cluster name -> end time of its ticket (Unix seconds)
    timings: dict[str, float]  # seconds: "s4u2self", then "proxy:<cluster>"


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

    def issue(self, principal: str, clusters: dict[str, str], lifetime: int) -> Issued:
        """Service tickets for ``principal`` to each ``clusters`` SPN, valid at most ``lifetime`` seconds.

        Raises DelegationRefused, KdcUnreachableError, CredentialsRejectedError (the broker's key),
        IdentityError (unknown user, not a user principal), TicketError.
        """
        realm = self.service_principal.rpartition("@")[2] if "@" in self.service_principal else _default_realm()
        principal = qualify(principal, realm)
        if "/" in principal.rpartition("@")[0]:
            raise IdentityError(f"refusing to act for {principal!r}: only user principals", code="invalid_request")
        clusters = {name: qualify(spn, realm) for name, spn in clusters.items()}
        if not clusters or lifetime <= 0:
            raise TicketError("issuing needs at least one service and a positive lifetime", code="invalid_request")
        with self._lock:
            self._counter += 1
            name = f"MEMORY:kerb-jupyter-broker-{os.getpid()}-{self._counter}"
        ctx = krb5.init_context()
        cc = krb5.cc_resolve(ctx, name.encode())
        user_cc = krb5.cc_resolve(ctx, (name + "-user").encode())
        timings: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            lifetime = min(lifetime, self._own_tgt(ctx, cc))
            svc = self._gss(lambda: gssapi.Credentials(
                name=gssapi.Name(self.service_principal, gssapi.NameType.kerberos_principal), usage="initiate",
                store={b"ccache": name.encode()}), "the broker's own ticket")
            user = gssapi.Name(principal, gssapi.NameType.kerberos_principal)
            imp = self._gss(lambda: svc.impersonate(user, usage="initiate"), f"acting for {principal}")
            timings["s4u2self"] = time.perf_counter() - t0
            for cluster, spn in clusters.items():
                t1 = time.perf_counter()
                target = gssapi.Name(spn, gssapi.NameType.kerberos_principal)
                self._gss(lambda t=target: gssapi.SecurityContext(
                    name=t, creds=imp, usage="initiate", lifetime=lifetime).step(), f"a ticket for {cluster}",
                    target=spn)
                timings[f"proxy:{cluster}"] = time.perf_counter() - t1
            # MIT keeps the proxy tickets with the impersonated credential: store it to read them back.
            imp.store(store={b"ccache": (name + "-user").encode()}, overwrite=True)
            return self._export(ctx, [cc, user_cc], principal, clusters, timings)
        finally:
            for c in (cc, user_cc):
                try:
                    krb5.cc_destroy(ctx, c)
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

    def _gss(self, call: object, what: str, target: str | None = None) -> gssapi.Credentials:
        try:
            return call()  # type: ignore[operator,no-any-return]
        except GSSError as err:
            raise classify(err, what, self.service_principal, target) from None

    def _export(self, ctx: krb5.Context, caches: list[krb5.CCache], principal: str, clusters: dict[str, str],
                timings: dict[str, float]) -> Issued:
        wanted = {spn_key(spn): (name, spn) for name, spn in clusters.items()}
        found: dict[str, tuple[str, bytes, int]] = {}
        for creds in (c for cc in caches for c in cc):
            client = creds.client.name.decode() if creds.client.name else ""
            server = creds.server.name.decode() if creds.server.name else ""
            hit = wanted.get(spn_key(server))
            if client.lower() == principal.lower() and hit is not None:
                name, spn = hit
                raw = krb5.marshal_credentials(ctx, creds)
                found[name] = (spn, rewrite_creds(raw, spn), creds.times.endtime)
        missing = sorted(set(clusters) - set(found))
        if missing:
            raise TicketError(f"the KDC gave no ticket for {', '.join(missing)}", code="no_service_ticket")
        body = b"".join(found[n][1] for n in sorted(found))
        cache = struct.pack(">HH", 0x0504, 0) + encode_principal(principal) + body
        return Issued(principal, cache, {n: found[n][2] for n in sorted(found)}, timings)


def spn_key(name: str) -> str:
    """``service/host`` without the realm, lower-case: proxy tickets may come back with an empty realm."""
    return name.rsplit("@", 1)[0].lower() if "@" in name else name.lower()


def classify(err: GSSError, what: str, service: str, target: str | None = None) -> TicketError | IdentityError:
    """The KDC's answer to S4U2Self (``target`` None) or to S4U2Proxy towards ``target``, as a coded error."""
    minor = err.min_code - (1 << 32) if err.min_code >= 1 << 31 else err.min_code
    text = str(err)
    if minor in KDC_UNREACHABLE or "Cannot contact any KDC" in text or "Cannot find KDC" in text:
        return KdcUnreachableError(f"{what}: the broker cannot reach the KDC")
    refused = minor in (_POLICY, _BADOPTION) or "can't fulfill requested option" in text
    if target is not None and (refused or "not allowed to delegate" in text.lower()):
        return DelegationRefused(f"{what}: {service} is not allowed to delegate to {target} (constrained "
                                 "delegation)")
    if refused:
        return DelegationRefused(f"{what}: the KDC refused {service} protocol transition (is it trusted to "
                                 "authenticate for delegation?)", code="impersonation_not_allowed")
    if (minor == _C_UNKNOWN or (minor == _S_UNKNOWN and target is None) or "Client not found" in text
            or ("Client '" in text and "not found" in text)):
        return IdentityError(f"{what}: the directory has no such user", code="unknown_principal")
    if minor == _S_UNKNOWN or "Server not found" in text or "not found in Kerberos database" in text:
        return TicketError(f"{what}: the KDC does not know the service principal {target}", code="service_unknown")
    if "Key table" in text or "keytab" in text.lower() or "Preauthentication failed" in text:
        return CredentialsRejectedError(f"{what}: the broker's keytab was refused ({text[:160]})")
    return TicketError(f"{what}: {text[:200]}")


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


# -- the FILE ccache format (version 4), the same encoding krb5_marshal_credentials produces ---------------
def _counted(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def encode_principal(name: str, name_type: int = 1) -> bytes:
    user, _, realm = name.rpartition("@")
    parts = user.split("/")
    return struct.pack(">II", name_type, len(parts)) + _counted(realm.encode()) + b"".join(
        _counted(p.encode()) for p in parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise TicketError("a credential from the KDC could not be decoded", code="bad_credential")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def counted(self) -> bytes:
        return self.take(self.u32())

    def principal(self) -> None:
        self.u32()
        count = self.u32()
        for _ in range(count + 1):
            self.counted()


def rewrite_creds(raw: bytes, spn: str) -> bytes:
    """A marshalled credential with the server principal set to ``spn`` (full realm) and no second ticket."""
    r = _Reader(raw)
    r.principal()
    client_end = r.pos
    r.principal()
    rest = r.pos
    r.take(2)
    r.counted()  # keyblock
    r.take(16)  # authtime, starttime, endtime, renew_till
    is_skey_at = r.pos
    r.take(1 + 4)  # is_skey, ticket flags
    for _ in range(2):  # addresses, authdata
        for _ in range(r.u32()):
            r.take(2)
            r.counted()
    r.counted()  # the service ticket
    ticket_end = r.pos
    r.counted()  # the evidence ticket: dropped
    return (raw[:client_end] + encode_principal(spn, name_type=2) + raw[rest:is_skey_at] + b"\x00"
            + raw[is_skey_at + 1:ticket_end] + _counted(b""))
