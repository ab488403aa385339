"""The directory's view of a mapped principal: its groups (nested ones included) and its own name, over LDAPS.

    "ldap": {"url": "ldaps://dc1.corp.example.com", "base": "DC=corp,DC=example,DC=com",
             "filter": "(|(userPrincipalName={user}@corp.example.local)(sAMAccountName={user}))",
             "bind_dn": "...", "password_file": "/etc/...", "ca_bundle": "/etc/broker/ad-ca.pem",
             "cache_seconds": 60, "timeout": 5}

TLS: the server's certificate must chain to ``ca_bundle`` (else the system store) and name the host of ``url``
(or ``server_name``, for a certificate naming the DC while the URL gives an address); the bind password is sent
only after that check. Plain ``ldap://`` is refused unless ``"allow_plain_ldap": true`` (then a WARNING in the
log at start-up): the password and the groups that decide grants would cross the network readable and forgeable.

Membership (``membership``): ``ad`` reads the user's constructed ``tokenGroups`` (every security group it is in,
through any depth of nesting, its primary group ``primaryGroupID`` and the groups that contain that one: what
its PAC says) and resolves them to DNs; ``memberof`` reads ``memberOf`` (direct groups only: OpenLDAP's memberof
overlay, which is what MIT's LDAP sandbox has; OpenLDAP implements neither tokenGroups nor AD's
LDAP_MATCHING_RULE_IN_CHAIN); ``auto`` (default) picks ``ad`` when the root DSE advertises Active Directory
(``supportedCapabilities`` 1.2.840.113556.1.4.800, which Samba does too).

Names (``principal_attribute``): the filter may find the user by another name than the mapped principal (a UPN
whose suffix is not the IdP's e-mail domain, a ``sAMAccountName``); the broker then acts for
``<that attribute>@<the mapped principal's realm>`` (``sAMAccountName`` by default with ``ad``, none otherwise).
Placeholders in ``filter``: ``{principal}`` (``alice@CORP.EXAMPLE.LOCAL``), ``{user}`` (``alice``), ``{realm}``.

Group DNs are compared case-insensitively (AD returns ``CN=``, OpenLDAP the case they were written in).
A directory that cannot be reached or verified is an error (``ldap_unavailable``), never "no groups".
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import ConfigError, KerbJupyterError
from .store import Store

log = logging.getLogger(__name__)

_KEYS = {"url", "base", "filter", "bind_dn", "password_file", "cache_seconds", "timeout", "ca_bundle",
         "server_name", "allow_plain_ldap", "membership", "principal_attribute", "group_base"}
AD_CAPABILITY = "1.2.840.113556.1.4.800"  # LDAP_CAP_ACTIVE_DIRECTORY_OID in the root DSE
_SID_BATCH = 64


class LdapUnavailable(KerbJupyterError):
    code = "ldap_unavailable"


@dataclass(frozen=True)
class LdapSettings:
    url: str
    base: str
    filter: str = "(krbPrincipalName={principal})"
    bind_dn: str | None = None
    password_file: Path | None = None
    cache_seconds: float = 60.0
    timeout: float = 5.0
    ca_bundle: Path | None = None
    server_name: str | None = None
    allow_plain: bool = False
    membership: str = "auto"
    principal_attribute: str | None = None
    group_base: str | None = None


@dataclass(frozen=True)
class Membership:
    """What the directory says about a principal: its group DNs and, if it names the user otherwise, that name."""

    groups: frozenset[str]
    principal: str | None = None


def parse_ldap(raw: Any) -> LdapSettings | None:
    """The ``ldap`` section, or None when absent. Raises ConfigError."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw.get("url") or not raw.get("base"):
        raise ConfigError("ldap must be an object with at least 'url' and 'base'")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"ldap: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    url = str(raw["url"])
    if not url.startswith(("ldap://", "ldaps://")):
        raise ConfigError("ldap.url must start with ldaps:// (or ldap:// with allow_plain_ldap)")
    allow_plain = raw.get("allow_plain_ldap", False)
    if not isinstance(allow_plain, bool):
        raise ConfigError("ldap.allow_plain_ldap must be true or false")
    if url.startswith("ldap://") and not allow_plain:
        raise ConfigError(f"ldap.url {url} is plain LDAP: the bind password and the groups that decide grants "
                          "would cross the network readable and forgeable; use ldaps:// (with ldap.ca_bundle) or "
                          "set \"allow_plain_ldap\": true")
    if url.startswith("ldaps://") and allow_plain:
        raise ConfigError("ldap.allow_plain_ldap is for ldap:// URLs only")
    filt = str(raw.get("filter", LdapSettings.filter))
    try:
        filt.format(principal="p", user="u", realm="r")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"ldap.filter: only {{principal}}, {{user}} and {{realm}} may be used ({err})") from None
    if "{principal}" not in filt and "{user}" not in filt:
        raise ConfigError("ldap.filter must contain {principal} or {user}")
    membership = raw.get("membership", "auto")
    if membership not in ("auto", "ad", "memberof"):
        raise ConfigError("ldap.membership must be auto, ad or memberof")
    for key in ("server_name", "principal_attribute", "group_base", "bind_dn"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"ldap.{key} must be a string")
    try:
        settings = LdapSettings(
            url=url, base=str(raw["base"]), filter=filt, bind_dn=raw.get("bind_dn"),
            password_file=Path(raw["password_file"]) if raw.get("password_file") else None,
            cache_seconds=float(raw.get("cache_seconds", 60)), timeout=float(raw.get("timeout", 5)),
            ca_bundle=Path(raw["ca_bundle"]) if raw.get("ca_bundle") else None,
            server_name=raw.get("server_name"), allow_plain=allow_plain, membership=membership,
            principal_attribute=raw.get("principal_attribute"), group_base=raw.get("group_base"),
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"ldap: {err}") from None
    if settings.ca_bundle is not None:
        try:
            tls_context(settings)
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"ldap.ca_bundle {settings.ca_bundle}: not a readable PEM CA bundle ({err})") from None
    return settings


def tls_context(settings: LdapSettings) -> ssl.SSLContext:
    """The client context for ldaps://: CERT_REQUIRED, host name checked, TLS 1.2 or later. Raises OSError."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(settings.ca_bundle) if settings.ca_bundle else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True  # (the default) and CERT_REQUIRED: ldap3's own Tls validates nothing by default
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


_VERIFIED_TLS: Any = None


def _verified_tls(context: ssl.SSLContext, server_name: str) -> Any:
    """An ``ldap3.Tls`` that wraps the socket with ``context`` (certificate and host name checked in the handshake,
    before ldap3 sends anything) instead of ldap3's own wrapping (``CERT_NONE`` unless told, and a host name check
    through the deprecated ``ssl.match_hostname``)."""
    global _VERIFIED_TLS
    if _VERIFIED_TLS is None:
        import ldap3

        class VerifiedTls(ldap3.Tls):  # type: ignore[misc]
            def __init__(self, context: ssl.SSLContext, server_name: str) -> None:
                super().__init__(validate=ssl.CERT_REQUIRED)
                self.context, self.server_name = context, server_name

            def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
                connection.socket = self.context.wrap_socket(connection.socket, server_side=False,
                                                             do_handshake_on_connect=do_handshake,
                                                             server_hostname=self.server_name)

        _VERIFIED_TLS = VerifiedTls
    return _VERIFIED_TLS(context, server_name)


class GroupDirectory:
    """``await directory.lookup(principal)`` -> Membership (group DNs as written by the directory)."""

    def __init__(self, settings: LdapSettings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self._ad: bool | None = {"ad": True, "memberof": False}.get(settings.membership)
        self._context = tls_context(settings) if settings.url.startswith("ldaps://") else None
        # whether every decision asks the directory for the user's name (else only rules with group conditions)
        self.renames = settings.principal_attribute is not None or settings.membership == "ad"
        if settings.allow_plain:
            log.warning("broker: ldap.url %s is plain LDAP (allow_plain_ldap): the bind password and the groups "
                        "cross the network unencrypted and unauthenticated", settings.url)

    async def lookup(self, principal: str) -> Membership:
        """Raises LdapUnavailable when the directory cannot be reached, verified or read."""
        key = "groups:" + principal
        cached = await self.store.get(key)
        if cached is not None:
            doc = json.loads(cached)
            if isinstance(doc, dict):
                return Membership(frozenset(doc["groups"]), doc.get("principal"))
        found = await asyncio.to_thread(self._search, principal)
        await self.store.put(key, json.dumps({"groups": sorted(found.groups), "principal": found.principal}),
                             self.settings.cache_seconds)
        return found

    async def groups(self, principal: str) -> frozenset[str]:
        return (await self.lookup(principal)).groups

    def _search(self, principal: str) -> Membership:
        import ldap3
        from ldap3.core.exceptions import LDAPException
        from ldap3.utils.conv import escape_filter_chars

        s = self.settings
        user, _, realm = principal.rpartition("@") if "@" in principal else (principal, "", "")
        query = s.filter.format(principal=escape_filter_chars(principal), user=escape_filter_chars(user),
                                realm=escape_filter_chars(realm))
        host = urlsplit(s.url).hostname or ""
        tls = _verified_tls(self._context, s.server_name or host) if self._context is not None else None
        try:
            # ldap3 packs socket timeouts as integers (SO_RCVTIMEO): whole seconds only.
            server = ldap3.Server(s.url, connect_timeout=max(int(s.timeout), 1), tls=tls, get_info=ldap3.NONE)
            conn = ldap3.Connection(server, user=s.bind_dn, receive_timeout=max(int(s.timeout), 1), read_only=True,
                                    password=s.password_file.read_text().strip() if s.password_file else None)
            # open() does the TLS handshake (certificate and name checked); bind() sends the password after it
            conn.open()
            with conn:
                if not conn.bind():
                    raise LdapUnavailable(f"the directory refused the broker's bind as {s.bind_dn}: "
                                          f"{conn.result.get('description', '?')}")
                return self._read(conn, principal, query, realm)
        except (LDAPException, OSError) as err:
            detail = " ".join(re.sub(r"[()\"',]+", " ", str(err)).split())[:200]  # ldap3 nests tuples in args
            raise LdapUnavailable(f"cannot read the groups of {principal} from {s.url}: {type(err).__name__}: "
                                  f"{detail}") from None

    def _read(self, conn: Any, principal: str, query: str, realm: str) -> Membership:
        import ldap3

        s = self.settings
        if self._ad is None:
            conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["supportedCapabilities"])
            caps = conn.response[0]["attributes"].get("supportedCapabilities", []) if conn.response else []
            self._ad = AD_CAPABILITY in caps
            log.info("broker: the directory at %s is %s", s.url,
                     "Active Directory (tokenGroups)" if self._ad else "not Active Directory (memberOf)")
        name_attr = s.principal_attribute or ("sAMAccountName" if self._ad else None)
        attrs = ["memberOf"] + ([name_attr] if name_attr else [])
        conn.search(s.base, query, attributes=attrs, size_limit=2)
        entries = [e for e in conn.response if e.get("type") == "searchResEntry"]
        if len(entries) != 1:
            log.info("broker: %d directory entries match %s: no groups", len(entries), principal)
            return Membership(frozenset())
        entry = entries[0]
        canonical = None
        if name_attr:
            value = entry["attributes"].get(name_attr)
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, str) and value:
                canonical = value if "@" in value or not realm else f"{value}@{realm}"
        if self._ad:
            groups = self._token_groups(conn, entry["dn"])
        else:
            groups = frozenset(str(v) for v in entry["attributes"].get("memberOf", []))
        return Membership(groups, canonical)

    def _token_groups(self, conn: Any, dn: str) -> frozenset[str]:
        """Every security group of ``dn`` (nested, primary and the primary group's own), as DNs."""
        import ldap3
        from ldap3.utils.conv import escape_bytes

        conn.search(dn, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["tokenGroups"])
        raw = conn.response[0].get("raw_attributes", {}).get("tokenGroups", []) if conn.response else []
        base = self.settings.group_base or ",".join(
            p for p in self.settings.base.split(",") if p.strip().lower().startswith("dc="))
        found: set[str] = set()
        for i in range(0, len(raw), _SID_BATCH):
            sids = "".join(f"(objectSid={escape_bytes(sid)})" for sid in raw[i:i + _SID_BATCH])
            conn.search(base, f"(|{sids})", attributes=["objectClass"])
            found.update(e["dn"] for e in conn.response if e.get("type") == "searchResEntry")
        return frozenset(found)
