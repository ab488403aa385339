"""One-shot, synchronous Kerberos operations (pykrb5): acquire, renew, inspect, and store atomically.

The FILE credential cache written here is the contract with the kernels: a private directory (0700) and
a cache file (0600) that is always replaced whole with ``os.replace``, so a reader never sees a cache
without its TGT. All functions block (about a millisecond on a LAN KDC); the keeper calls them from a
thread. Errors are translated into the kerb_jupyter tree; messages never carry key material.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import krb5

from . import files
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
    """What the cache holds: the client principal and the TGT's times (Unix seconds).

    A cache from the credential broker has no TGT, only service tickets: then ``services`` lists them as
    (service principal, end time), the times are the earliest ticket's and ``renewable`` is False.
    """

    principal: str
    starttime: int
    endtime: int
    renew_till: int
    renewable: bool
    cache: str
    services: tuple[tuple[str, int], ...] = ()

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


def acquire_with_keytab_data(
    principal: str, data: bytes, cache: str | Path, lifetime: int | None = None,
    renew_life: int | None = None,
) -> TicketInfo:
    """Like ``acquire_with_keytab`` for a keytab held in memory (from Secrets Manager): its keys go into a
    ``MEMORY:`` keytab with a random name, never to disk, and are freed when this call returns.

    Raises CredentialsRejectedError (also for bytes that are not a keytab), KdcUnreachableError, TicketError,
    CacheError."""
    try:
        entries = parse_keytab(data)
    except ValueError as err:
        raise CredentialsRejectedError(f"the keytab for {principal} is not a valid keytab ({err})") from None
    ctx = _context()
    try:
        creds = _creds_from_memory_keytab(ctx, principal, entries, lifetime, renew_life)
    except krb5.Krb5Error as err:
        raise _classify(err, "getting a ticket from the keytab", principal) from None
    return store(ctx, creds, cache)


def _creds_from_memory_keytab(ctx: krb5.Context, principal: str, entries: list[KeytabEntry], lifetime: int | None,
                              renew_life: int | None) -> krb5.Creds:
    # The keytab handle lives only in this frame: MIT frees a MEMORY keytab and its keys when the last handle
    # closes (checked: resolving the same name afterwards finds no entries).
    kt = krb5.kt_resolve(ctx, f"MEMORY:kerb_jupyter-{secrets.token_hex(16)}".encode())
    for realm, components, timestamp, kvno, enctype, key in entries:
        name = krb5.build_principal(ctx, realm, components)
        krb5.kt_add_entry(ctx, kt, name, kvno, timestamp, krb5.init_keyblock(ctx, enctype, key))
    client = krb5.parse_name_flags(ctx, principal.encode())
    return krb5.get_init_creds_keytab(ctx, client, _options(ctx, lifetime, renew_life), keytab=kt)


KeytabEntry = tuple[bytes, list[bytes], int, int, int, bytes]  # realm, components, timestamp, kvno, enctype, key


def parse_keytab(data: bytes) -> list[KeytabEntry]:
    """The entries of a version 0x502 keytab (the format MIT, Heimdal and AD's ktpass write). Raises ValueError."""
    if data[:2] != b"\x05\x02":
        raise ValueError("not a version 2 keytab")
    entries, i = [], 2
    while i + 4 <= len(data):
        (size,) = struct.unpack_from(">i", data, i)
        i += 4
        if size == 0:
            break
        if size > 0:
            entries.append(_keytab_entry(data[i:i + size]))
        i += abs(size)  # a negative size is a hole left by a removed entry
    if not entries:
        raise ValueError("no keys in it")
    return entries


def _keytab_entry(e: bytes) -> KeytabEntry:
    try:
        (count,) = struct.unpack_from(">H", e, 0)
        pos = 2
        strings = []
        for _ in range(count + 1):  # the realm, then each component
            (length,) = struct.unpack_from(">H", e, pos)
            if pos + 2 + length > len(e):
                raise ValueError("truncated entry")
            strings.append(e[pos + 2:pos + 2 + length])
            pos += 2 + length
        _name_type, timestamp, kvno, enctype, length = struct.unpack_from(">IIBHH", e, pos)
        pos += 13
        key = e[pos:pos + length]
        if len(key) != length:
            raise ValueError("truncated key")
        pos += length
        if len(e) - pos >= 4 and struct.unpack_from(">I", e, pos)[0]:
            kvno = struct.unpack_from(">I", e, pos)[0]  # the 32-bit kvno, when present, wins over the 8-bit one
    except struct.error:
        raise ValueError("truncated entry") from None
    return strings[0], strings[1:], timestamp, kvno, enctype, key


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
    """Write ``creds`` to a new cache (unpredictable name, 0600) next to ``cache`` and rename it into place.

    Raises ConfigError (code ``unsafe_directory``) when the directory is not private, CacheError otherwise."""
    target = Path(cache)
    directory = ensure_private_dir(target.parent)
    try:
        with files.private_temp(directory, f".{target.name}.") as tmp:
            cc = krb5.cc_resolve(ctx, f"FILE:{tmp}".encode())
            krb5.cc_initialize(ctx, cc, creds.client)
            krb5.cc_store_cred(ctx, cc, creds)
            os.replace(tmp, target)  # replaces whatever is at target (a planted symlink too), never follows it
    except krb5.Krb5Error as err:
        raise CacheError(f"could not write the credential cache {target}: {err}") from None
    except OSError as err:
        raise CacheError(f"could not write the credential cache {target}: {err.strerror}") from None
    return read_cache(target, allow_expired=True)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` 0700, or check that an existing one is a real directory of ours that nobody else can
    write to (never tightened: a loose one is refused). Raises ConfigError (code ``unsafe_directory``)."""
    return files.check_private_dir(path, "credential directory")


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
        services: list[tuple[str, int, int]] = []
        for creds in cc:
            if creds.server.name == tgt_name:
                break
            server = creds.server.name.decode(errors="replace") if creds.server.name else ""
            if not server.startswith(("krbtgt/", "X-CACHECONF:")) and creds.client.name == client.name:
                times = creds.times
                services.append((server, times.starttime or times.authtime, times.endtime))
        else:
            if services:  # the broker's kind of cache: service tickets, no TGT
                return TicketInfo(
                    principal=name, starttime=min(s[1] for s in services), endtime=min(s[2] for s in services),
                    renew_till=min(s[2] for s in services), renewable=False, cache=str(path),
                    services=tuple(sorted((s[0], s[2]) for s in services)),
                )
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
