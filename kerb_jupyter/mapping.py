"""Identity name -> Active Directory principal, by rules tried in order (first match wins, never a guess).

    "mapping": {"rules": [
        {"table": {"alice@example.com": "asmith@CORP.EXAMPLE.COM"}},
        {"regex": "^(?P<user>[a-z0-9.]+)@example\\\\.com$", "principal": "{user}@CORP.EXAMPLE.COM"},
        {"template": "{local}@CORP.EXAMPLE.COM", "case": "lower", "domain": "example.com"}
    ]}

Template fields: ``{name}`` (the whole identity), ``{local}`` and ``{domain}`` (around its last ``@``), and a
regex rule's named groups. The realm always comes out upper-case; the user part may not contain ``/`` (no
service principals from user input), ``@``, whitespace, quotes or control characters.
"""

from __future__ import annotations

import re
import string
from typing import Any

from .errors import ConfigError, IdentityError

_USER_PART = re.compile(r"^[^\s@/\\\"'`;:,()<>\[\]{}*?]{1,104}$")
_REALM = re.compile(r"^[A-Z0-9][A-Z0-9.-]{0,253}$")


def _fields(name: str) -> dict[str, str]:
    local, _, domain = name.rpartition("@") if "@" in name else (name, "", "")
    return {"name": name, "local": local, "domain": domain}


def _format(template: str, values: dict[str, str], rule_no: int) -> str:
    try:
        return string.Formatter().vformat(template, (), values)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"mapping rule {rule_no}: bad template {template!r} ({err})") from None


def _case(value: str, case: str) -> str:
    return {"lower": value.lower(), "upper": value.upper()}.get(case, value)


def _apply(rule: dict[str, Any], name: str, no: int) -> str | None:
    if "table" in rule:
        table = rule["table"]
        if not isinstance(table, dict):
            raise ConfigError(f"mapping rule {no}: 'table' must be an object of identity -> principal")
        hit = table.get(name)
        if hit is None and rule.get("case_insensitive", True):
            hit = next((v for k, v in table.items() if str(k).lower() == name.lower()), None)
        return None if hit is None else str(hit)
    if "regex" in rule:
        try:
            m = re.fullmatch(rule["regex"], name)
        except re.error as err:
            raise ConfigError(f"mapping rule {no}: bad regex {rule['regex']!r}: {err}") from None
        if not m:
            return None
        values = {**_fields(name), **{k: v or "" for k, v in m.groupdict().items()}}
        return _format(str(rule.get("principal", "")), {k: _case(v, rule.get("case", "keep")) for k, v in
                                                        values.items()}, no)
    if "template" in rule:
        fields = _fields(name)
        wanted = rule.get("domain")
        if wanted is not None and fields["domain"].lower() != str(wanted).lower():
            return None
        return _format(str(rule["template"]), {k: _case(v, rule.get("case", "keep")) for k, v in fields.items()}, no)
    raise ConfigError(f"mapping rule {no} has none of 'table', 'regex', 'template'")


def _describe(rule: dict[str, Any]) -> str:
    if "table" in rule:
        return f"table of {len(rule['table']) if isinstance(rule['table'], dict) else '?'} entries"
    if "regex" in rule:
        return f"regex {rule['regex']!r}"
    return f"template {rule.get('template')!r}"


def map_identity(name: str, spec: dict[str, Any]) -> str:
    """The principal for identity ``name``. Raises IdentityError when no rule matches or the result is
    not a safe user principal, ConfigError for malformed rules."""
    rules = spec.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError("mapping.rules must be a list of rule objects")
    for no, rule in enumerate(rules, 1):
        result = _apply(rule, name, no)
        if result is None:
            continue
        return normalise_principal(result, f"mapping rule {no} ({_describe(rule)}) turned {name[:80]!r} into")
    tried = "; ".join(f"{no}: {_describe(r)}" for no, r in enumerate(rules, 1)) or "no rules are configured"
    raise IdentityError(f"no mapping rule matches the identity {name[:80]!r} (rules tried: {tried})",
                        code="unmapped_identity")


def normalise_principal(value: str, what: str) -> str:
    """``user@REALM`` with the realm upper-cased; raises IdentityError for anything else."""
    user, sep, realm = value.rpartition("@")
    realm = realm.upper()
    if not sep or not _USER_PART.match(user) or not _REALM.match(realm) or any(ord(c) > 126 for c in user):
        raise IdentityError(f"{what} {value[:80]!r}, which is not a valid user principal (user@REALM)",
                            code="bad_principal")
    return f"{user}@{realm}"
