"""Directory groups of a mapped principal, read over LDAP (``memberOf``) and cached briefly in the store.

    "ldap": {"url": "ldaps://dc1.corp.example.com", "base": "DC=corp,DC=example,DC=com",
             "filter": "(userPrincipalName={principal})", "bind_dn": "...", "password_file": "/etc/...",
             "cache_seconds": 60, "timeout": 5}

Group DNs are compared case-insensitively (AD returns ``CN=``, OpenLDAP the case they were written in).
A directory that cannot be reached is an error (``ldap_unavailable``), never "no groups".
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, KerbJupyterError
from .store import Store

log = logging.getLogger(__name__)

_KEYS = {"url", "base", "filter", "bind_dn", "password_file", "cache_seconds", "timeout", "ca_bundle"}


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


def parse_ldap(raw: Any) -> LdapSettings | None:
    """The ``ldap`` section, or None when absent. Raises ConfigError."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw.get("url") or not raw.get("base"):
        raise ConfigError("ldap must be an object with at least 'url' and 'base'")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ConfigError(f"ldap: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    if not str(raw["url"]).startswith(("ldap://", "ldaps://")):
        raise ConfigError("ldap.url must start with ldap:// or ldaps://")
    filt = str(raw.get("filter", LdapSettings.filter))
    if "{principal}" not in filt and "{user}" not in filt:
        raise ConfigError("ldap.filter must contain {principal} or {user}")
    try:
        return LdapSettings(
            url=str(raw["url"]), base=str(raw["base"]), filter=filt, bind_dn=raw.get("bind_dn"),
            password_file=Path(raw["password_file"]) if raw.get("password_file") else None,
            cache_seconds=float(raw.get("cache_seconds", 60)), timeout=float(raw.get("timeout", 5)),
            ca_bundle=Path(raw["ca_bundle"]) if raw.get("ca_bundle") else None,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"ldap: {err}") from None


class GroupDirectory:
    """``await directory.groups(principal)`` -> the group DNs (as written by the directory)."""

    def __init__(self, settings: LdapSettings, store: Store) -> None:
        self.settings = settings
        self.store = store

    async def groups(self, principal: str) -> frozenset[str]:
        key = "groups:" + principal
        cached = await self.store.get(key)
        if cached is not None:
            return frozenset(json.loads(cached))
        found = await asyncio.to_thread(self._search, principal)
        await self.store.put(key, json.dumps(sorted(found)), self.settings.cache_seconds)
        return found

    def _search(self, principal: str) -> frozenset[str]:
        import ldap3
        from ldap3.core.exceptions import LDAPException
        from ldap3.utils.conv import escape_filter_chars

        s = self.settings
        user = principal.rsplit("@", 1)[0]
        query = s.filter.format(principal=escape_filter_chars(principal), user=escape_filter_chars(user))
        password = s.password_file.read_text().strip() if s.password_file else None
        tls = ldap3.Tls(ca_certs_file=str(s.ca_bundle)) if s.ca_bundle else None
        try:
            # ldap3 packs socket timeouts as integers (SO_RCVTIMEO): whole seconds only.
            server = ldap3.Server(s.url, connect_timeout=max(int(s.timeout), 1), tls=tls)
            with ldap3.Connection(server, user=s.bind_dn, password=password, receive_timeout=max(int(s.timeout), 1),
                                  auto_bind=True, read_only=True) as conn:
                conn.search(s.base, query, attributes=["memberOf"], size_limit=2)
                entries = list(conn.entries)
        except (LDAPException, OSError) as err:
            raise LdapUnavailable(f"cannot read the groups of {principal} from {s.url}: {type(err).__name__}") from None
        if len(entries) != 1:
            log.info("broker: %d directory entries match %s: no groups", len(entries), principal)
            return frozenset()
        values = entries[0].entry_attributes_as_dict.get("memberOf", [])
        return frozenset(str(v) for v in values)
