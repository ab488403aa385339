"""Service tickets for a user without the user's key: S4U2Self + S4U2Proxy from a service keytab, as a clean ccache.

    data = impersonate("/etc/broker.keytab", "HTTP/broker.example.com", "alice", ["postgres/db.example.com"], 3600)

``data`` is a FILE-format credential cache (bytes) whose default principal is the user and which holds only the
service tickets asked for, each under its full ``service/host@REALM`` name (python-gssapi would store them with
an empty realm, which a client with a ``[domain_realm]`` mapping cannot find), with the evidence ticket removed
from each and neither the service's TGT nor the user's S4U2Self ticket in it.

Raises :class:`~kerb_jupyter.errors.SourceError` with ``code`` one of ``invalid_request``, ``delegation_not_allowed``
(the KDC refused S4U2Proxy to that service), ``impersonation_not_allowed``, ``unknown_principal``,
``kdc_unreachable``, ``keytab_error`` or ``impersonation_failed``. Messages name principals only.
"""

from __future__ import annotations

import os
import secrets
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gssapi
import krb5
from gssapi.raw.misc import GSSError

from .errors import SourceError

__all__ = ["impersonate", "write_ccache"]

_KRB5_BASE = 0x96C73A00  # ERROR_TABLE_BASE_krb5 as an unsigned 32-bit minor status
_C_PRINCIPAL_UNKNOWN, _S_PRINCIPAL_UNKNOWN, _POLICY, _BADOPTION = (_KRB5_BASE + n for n in (6, 7, 12, 13))
_KDC_UNREACH = _KRB5_BASE + 156
_KT_NOTFOUND, _KT_NOTFOUND_FILE = _KRB5_BASE + 142, 2  # KRB5_KT_NOTFOUND, ENOENT


def impersonate(
    service_keytab: str | Path,
    service_principal: str,
    user: str,
    spns: Sequence[str],
    lifetime: int,
    service_ccache: str | None = None,
) -> bytes:
    """S4U2Self for ``user``, then S4U2Proxy to each of ``spns`` (``service/host`` or ``service/host@REALM``);
    returns the FILE ccache bytes (see the module docstring). ``lifetime`` caps each ticket in seconds.

    ``service_ccache`` (e.g. ``"MEMORY:broker"``) keeps the service's own TGT between calls; by default each
    call gets a fresh TGT from the keytab. Raises SourceError.
    """
    realm = service_principal.rpartition("@")[2] if "@" in service_principal else _default_realm()
    service_principal = _qualify(service_principal, realm, "service")
    user_princ = _qualify(user, realm, "user")
    if "/" in user_princ.partition("@")[0]:
        raise SourceError(f"refusing to impersonate {user_princ!r}: only user principals", code="invalid_request")
    targets = [_qualify(spn, realm, "service") for spn in spns]
    if not targets or lifetime <= 0:
        raise SourceError("impersonation needs at least one service and a positive lifetime", code="invalid_request")
    own = service_ccache is None
    ccache = f"MEMORY:kj-s4u-{secrets.token_hex(8)}" if own else str(service_ccache)
    try:
        return _impersonate(str(service_keytab), service_principal, user_princ, targets, lifetime, ccache)
    finally:
        if own:
            _destroy(ccache)


def _impersonate(keytab: str, service: str, user: str, targets: list[str], lifetime: int, ccache: str) -> bytes:
    kind = gssapi.NameType.kerberos_principal
    try:
        svc = gssapi.Credentials(name=gssapi.Name(service, kind), usage="initiate",
                                 store={"client_keytab": keytab, "ccache": ccache})
        imp = svc.impersonate(gssapi.Name(user, kind), usage="initiate")
    except GSSError as err:
        raise _classify(err, f"{service} could not impersonate {user}", user) from None
    for target in targets:
        try:
            gssapi.SecurityContext(name=gssapi.Name(target, kind), creds=imp, usage="initiate",
                                   lifetime=lifetime).step()
        except GSSError as err:
            raise _classify(err, f"{service} is not allowed to delegate to {target}", target, proxy=True) from None
    return _clean_ccache(imp, user, targets)


def _clean_ccache(imp: gssapi.Credentials, user: str, targets: list[str]) -> bytes:
    """Copy the proxy tickets out of gssapi's cache into a new FILE cache, without their evidence tickets."""
    ctx = krb5.init_context()
    with tempfile.TemporaryDirectory(prefix="kj-s4u-") as tmp:
        raw = f"FILE:{tmp}/raw"
        imp.store(store={"ccache": raw}, overwrite=True)
        found: dict[str, krb5.Creds] = {}
        for creds in krb5.cc_resolve(ctx, raw.encode()):
            server = (creds.server.name or b"").decode()
            if (creds.client.name or b"").decode() == user and server in targets:
                found[server] = krb5.unmarshal_credentials(ctx, _strip_second_ticket(ctx, creds))
        missing = [t for t in targets if t not in found]
        if missing:
            raise SourceError(f"the KDC returned no ticket for {', '.join(missing)}", code="impersonation_failed")
        out = krb5.cc_resolve(ctx, f"FILE:{tmp}/out".encode())
        krb5.cc_initialize(ctx, out, krb5.parse_name_flags(ctx, user.encode()))
        for target in targets:
            krb5.cc_store_cred(ctx, out, found[target])
        return Path(tmp, "out").read_bytes()


def _strip_second_ticket(ctx: krb5.Context, creds: krb5.Creds) -> bytes:
    """The marshalled creds (FILE v4 layout, second ticket last) with an empty second ticket."""
    data, second = krb5.marshal_credentials(ctx, creds), creds.second_ticket
    n = len(second)
    if data[len(data) - n - 4:len(data) - n] != struct.pack(">I", n) or data[len(data) - n:] != second:
        raise SourceError("unexpected credential layout from libkrb5", code="impersonation_failed")
    return data[:len(data) - n - 4] + struct.pack(">I", 0)


def write_ccache(data: bytes, path: str | Path) -> Path:
    """Write ccache bytes to ``path`` atomically, mode 0600 (for KRB5CCNAME=FILE:path)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".kj-cc-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _default_realm() -> str:
    try:
        return krb5.get_default_realm(krb5.init_context()).decode()
    except krb5.Krb5Error:
        raise SourceError("no default realm in krb5.conf: give the service principal with its @REALM",
                          code="invalid_request") from None


def _qualify(name: str, realm: str, what: str) -> str:
    base, at, r = name.partition("@")
    if not base or (at and not r) or any(c in name for c in "\0\n\r\t ") or name.count("@") > 1:
        raise SourceError(f"not a Kerberos {what} principal: {name!r}", code="invalid_request")
    return name if at else f"{name}@{realm}"


def _classify(err: GSSError, what: str, who: str, proxy: bool = False) -> SourceError:
    minor = err.min_code & 0xFFFFFFFF
    if proxy and minor in (_POLICY, _BADOPTION):
        return SourceError(f"{what} (the KDC refused constrained delegation)", code="delegation_not_allowed")
    if minor in (_POLICY, _BADOPTION):
        return SourceError(f"{what}: the KDC refused protocol transition (is the service trusted to "
                           "authenticate for delegation?)", code="impersonation_not_allowed")
    if minor in (_C_PRINCIPAL_UNKNOWN, _S_PRINCIPAL_UNKNOWN):
        return SourceError(f"{what}: {who} is not known to the KDC", code="unknown_principal")
    if minor == _KDC_UNREACH:
        return SourceError(f"{what}: the KDC could not be reached", code="kdc_unreachable")
    if minor in (_KT_NOTFOUND, _KT_NOTFOUND_FILE):
        return SourceError(f"{what}: the service keytab has no usable key", code="keytab_error")
    return SourceError(f"{what}: {_short(err)}", code="impersonation_failed")


def _short(err: GSSError) -> str:
    return str(err.gen_message()).replace("\n", " ")[:300]


def _destroy(ccache: str) -> None:
    ctx = krb5.init_context()
    try:
        krb5.cc_destroy(ctx, krb5.cc_resolve(ctx, ccache.encode()))
    except krb5.Krb5Error:
        pass  # never created (the keytab or the KDC failed first)
