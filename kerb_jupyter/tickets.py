"""One-shot, synchronous Kerberos operations (pykrb5): acquire, renew, inspect, and store atomically.

The FILE credential cache written here is the contract with the kernels: a private directory (0700) and
a cache file (0600) that is always replaced whole with ``os.replace``, so a reader never sees a cache
without its TGT. All functions block (about a millisecond on a LAN KDC); the keeper calls them from a
thread. Errors are translated into the kerb_jupyter tree; messages never carry key material.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import krb5

from .errors import (
    CacheError,
    CredentialsRejectedError,
    KdcUnreachableError,
    NoTicketError,
    TicketError,
    TicketExpiredError,
)

# MIT krb5 error codes (com_err table "krb5"), used to classify failures.
KDC_UNREACHABLE = {-1765328228, -1765328164}  # KRB5_KDC_UNREACH, KRB5_REALM_CANT_RESOLVE
REJECTED = {
    -1765328378,  # KRB5KDC_ERR_C_PRINCIPAL_UNKNOWN: no such principal
    -1765328366,  # KRB5KDC_ERR_CLIENT_REVOKED: disabled or locked out
    -1765328361,  # KRB5KDC_ERR_KEY_EXP: password expired
    -1765328360,  # KRB5KDC_ERR_PREAUTH_FAILED: wrong password / stale keytab
    -1765328353,  # KRB5KRB_AP_ERR_BAD_INTEGRITY: wrong password (no preauth)
    -1765328203,  # KRB5_KT_NOTFOUND: keytab has no key for this principal
    -1765328174,  # KRB5_PREAUTH_FAILED
}
EXPIRED = {-1765328352}  # KRB5KRB_AP_ERR_TKT_EXPIRED
NOT_RENEWABLE = {-1765328371, -1765328372}  # KRB5KDC_ERR_BADOPTION, KRB5KDC_ERR_POLICY
SKEW = -1765328347  # KRB5KRB_AP_ERR_SKEW


@dataclass(frozen=True)
class TicketInfo:
    """What the cache holds: the client principal and the TGT's times (Unix seconds)."""

    principal: str
    starttime: int
    endtime: int
    renew_till: int
    renewable: bool
    cache: str

    def remaining(self, now: float | None = None) -> float:
        return self.endtime - (time.time() if now is None else now)

    def expired(self, now: float | None = None) -> bool:
        return self.remaining(now) <= 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _context() -> krb5.Context:
    # A new context per operation re-reads KRB5_CONFIG, so tests and config changes take effect.
    return krb5.init_context()


def _classify(err: krb5.Krb5Error, what: str, principal: str) -> TicketError:
    """The error a user reads: krb5's words without its number (kept as ``krb5_code`` for logs and the API)."""
    code = err.err_code
    error = _classify_words(err, what, principal)
    error.krb5_code = code  # type: ignore[attr-defined]
    return error


def _classify_words(err: krb5.Krb5Error, what: str, principal: str) -> TicketError:
    code = err.err_code
    text = re.sub(r"\s*-?\d{6,}$", "", str(err)).strip() or "an unexplained Kerberos error"
    if code in KDC_UNREACHABLE:
        return KdcUnreachableError(f"{what} for {principal}: cannot reach the KDC ({text})")
    if code in REJECTED:
        return CredentialsRejectedError(
            f"{what} for {principal}: the KDC rejected the credentials ({text}); "
            "check the password or keytab and that the account is enabled"
        )
    if code in EXPIRED:
        return TicketExpiredError(f"{what} for {principal}: the ticket has expired ({text})")
    if code == SKEW:
        return TicketError(f"{what} for {principal}: clock skew too great against the KDC ({text})",
                           code="clock_skew")
    if code in NOT_RENEWABLE:
        return TicketError(f"{what} for {principal}: the KDC refused to renew the ticket ({text})",
                           code="not_renewable")
    return TicketError(f"{what} for {principal}: {text}")


def _options(ctx: krb5.Context, lifetime: int | None, renew_life: int | None) -> krb5.GetInitCredsOpt:
    opt = krb5.get_init_creds_opt_alloc(ctx)
    krb5.get_init_creds_opt_set_forwardable(opt, True)
    # MIT's client default renew_lifetime is 0: always ask for a renewable ticket explicitly.
    krb5.get_init_creds_opt_set_renew_life(opt, renew_life if renew_life is not None else 7 * 86400)
    if lifetime:
        krb5.get_init_creds_opt_set_tkt_life(opt, lifetime)
    return opt


def acquire_with_keytab(
    principal: str, keytab: str | Path, cache: str | Path, lifetime: int | None = None,
    renew_life: int | None = None,
) -> TicketInfo:
    """Get a TGT for ``principal`` with a keytab and store it in ``cache``.

    Raises KdcUnreachableError, CredentialsRejectedError, TicketError, CacheError.
    """
    path = Path(keytab)
    if not path.is_file():
        raise CredentialsRejectedError(f"the keytab {path} for {principal} does not exist")
    ctx = _context()
    try:
        client = krb5.parse_name_flags(ctx, principal.encode())
        kt = krb5.kt_resolve(ctx, f"FILE:{path}".encode())
        creds = krb5.get_init_creds_keytab(ctx, client, _options(ctx, lifetime, renew_life), keytab=kt)
    except krb5.Krb5Error as err:
        raise _classify(err, "getting a ticket from the keytab", principal) from None
    return store(ctx, creds, cache)


def acquire_with_password(
    principal: str, password: bytes, cache: str | Path, lifetime: int | None = None,
    renew_life: int | None = None,
) -> TicketInfo:
    """Get a TGT with a password (held only for this call) and store it in ``cache``."""
    ctx = _context()
    try:
        client = krb5.parse_name_flags(ctx, principal.encode())
        creds = krb5.get_init_creds_password(ctx, client, _options(ctx, lifetime, renew_life),
                                             password=password)
    except krb5.Krb5Error as err:
        raise _classify(err, "getting a ticket with the password", principal) from None
    return store(ctx, creds, cache)


def renew(cache: str | Path) -> TicketInfo:
    """Renew the TGT in ``cache`` (renew_till does not move) and replace the cache atomically."""
    info = read_cache(cache, allow_expired=True)
    ctx = _context()
    try:
        cc = krb5.cc_resolve(ctx, f"FILE:{cache}".encode())
        client = krb5.parse_name_flags(ctx, info.principal.encode())
        creds = krb5.get_renewed_creds(ctx, client, cc)
    except krb5.Krb5Error as err:
        raise _classify(err, "renewing the ticket", info.principal) from None
    return store(ctx, creds, cache)


def store(ctx: krb5.Context, creds: krb5.Creds, cache: str | Path) -> TicketInfo:
    """Write ``creds`` to a new cache next to ``cache`` and atomically rename it into place."""
    target = Path(cache)
    ensure_private_dir(target.parent)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        cc = krb5.cc_resolve(ctx, f"FILE:{tmp}".encode())
        krb5.cc_initialize(ctx, cc, creds.client)
        krb5.cc_store_cred(ctx, cc, creds)
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except krb5.Krb5Error as err:
        raise CacheError(f"could not write the credential cache {target}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return read_cache(target, allow_expired=True)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` 0700, or check an existing one is ours and private. Raises CacheError."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise CacheError(f"the credential directory {path} belongs to uid {st.st_uid}, not to this user")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


_MEMO: dict[Path, tuple[tuple[int, ...], TicketInfo]] = {}


def read_cache(cache: str | Path, allow_expired: bool = False) -> TicketInfo:
    """Inspect a FILE cache without trusting it blindly.

    Raises NoTicketError (missing, or no TGT), CacheError (empty, corrupt, wrong owner or mode) and,
    unless ``allow_expired``, TicketExpiredError. An unchanged file (same inode, size, mtime, owner, mode)
    is not parsed again: the keeper always replaces the file, so any renewal changes the key.
    """
    path = cache if isinstance(cache, Path) else Path(str(cache).removeprefix("FILE:"))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NoTicketError(f"there is no ticket cache at {path} yet") from None
    key = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_uid, st.st_mode)
    memo = _MEMO.get(path)
    if memo is not None and memo[0] == key:
        return _check_expiry(memo[1], allow_expired)
    info = _parse_cache(path, st)
    _MEMO[path] = (key, info)
    return _check_expiry(info, allow_expired)


def _check_expiry(info: TicketInfo, allow_expired: bool) -> TicketInfo:
    if not allow_expired and info.expired():
        raise TicketExpiredError(
            f"the ticket for {info.principal} expired at "
            f"{time.strftime('%H:%M:%S', time.localtime(info.endtime))}"
        )
    return info


def _parse_cache(path: Path, st: os.stat_result) -> TicketInfo:
    if st.st_uid != os.geteuid():
        raise CacheError(f"the ticket cache {path} belongs to uid {st.st_uid}, not to this user: not used")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise CacheError(
            f"the ticket cache {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}): not used"
        )
    if st.st_size == 0:
        raise CacheError(f"the ticket cache {path} is empty")
    ctx = _context()
    try:
        cc = krb5.cc_resolve(ctx, f"FILE:{path}".encode())
        client = cc.principal
        if client is None:
            raise CacheError(f"the ticket cache {path} has no principal")
        name = client.name.decode() if client.name else ""
        realm = name.rsplit("@", 1)[-1]
        tgt_name = f"krbtgt/{realm}@{realm}".encode()
        for creds in cc:
            if creds.server.name == tgt_name:
                break
        else:
            raise NoTicketError(f"the ticket cache {path} holds no ticket-granting ticket for {name}")
    except krb5.Krb5Error as err:
        raise CacheError(f"the ticket cache {path} is unreadable or corrupt ({err})") from None
    times = creds.times
    return TicketInfo(
        principal=name,
        starttime=times.starttime or times.authtime,
        endtime=times.endtime,
        renew_till=times.renew_till,
        renewable=bool(creds.ticket_flags & krb5.TicketFlags.renewable),
        cache=str(path),
    )
