"""Identity name -> Active Directory principal, by rules tried in order (first match wins, never a guess).

    "mapping": {"rules": [
        {"table": {"alice@example.com": "asmith@CORP.EXAMPLE.COM"}},
        {"regex": "^(?P<user>[a-z0-9.]+)@example\\\\.com$", "principal": "{user}@CORP.EXAMPLE.COM"},
        {"template": "{local}@CORP.EXAMPLE.COM", "case": "lower", "domain": "example.com"}
    ]}

Template fields: ``{name}`` (the whole identity), ``{local}`` and ``{domain}`` (around its last ``@``), and a
regex rule's named groups. The realm always comes out upper-case; the user part may not contain ``/`` (no
service principals from user input), ``@``, whitespace, quotes or control characters.

One identity, one principal: the identity must be plain ASCII as given (``identity.validate_name``), table keys
and results too; tables compare exactly or, with ``case_insensitive`` (the default), after ASCII-only case
folding; regexes are compiled with ``re.ASCII`` (so ``\\w`` and ``(?i)`` match no look-alike letters); ``case``
and the realm upper-casing change ASCII letters only. Nothing is normalised: a Kelvin sign is refused, not
read as ``k``.
"""

from __future__ import annotations

import functools
import re
import string
from typing import Any

from .checks import check_template, shown
from .errors import ConfigError, IdentityError
from .identity import validate_name

_USER_PART = re.compile(r"^[^\s@/\\\"'`;:,()<>\[\]{}*?]{1,104}$", re.ASCII)
_REALM = re.compile(r"^[A-Z0-9][A-Z0-9.-]{0,253}$", re.ASCII)
_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def ascii_lower(value: str) -> str:
    """Lower-case A-Z only: ``str.lower`` would also turn the Kelvin sign into ``k``."""
    return value.translate(_LOWER)


def ascii_upper(value: str) -> str:
    """Upper-case a-z only: ``str.upper`` would also turn a dotless i into ``I`` and long s into ``S``."""
    return value.translate(_UPPER)


def _fields(name: str) -> dict[str, str]:
    local, _, domain = name.rpartition("@") if "@" in name else (name, "", "")
    return {"name": name, "local": local, "domain": domain}


def _format(template: str, values: dict[str, str], where: str) -> str:
    try:
        return string.Formatter().vformat(template, (), values)
    except (KeyError, IndexError, ValueError) as err:  # a conversion or format spec the values do not take
        raise ConfigError(f"{where}: bad template {template!r} ({err})") from None


def _case(value: str, case: str) -> str:
    return {"lower": ascii_lower, "upper": ascii_upper}.get(case, str)(value)


def validate_spec(spec: dict[str, Any], label: str = "") -> None:
    """Check every rule of the ``mapping`` section. Raises ConfigError naming the rule and key (after ``label``)."""
    prefix = f"{label}: " if label else ""
    for no, rule in enumerate(_rules(spec, prefix), 1):
        _check_rule(rule, f"{prefix}mapping.rules[{no}]")


def _rules(spec: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    rules = spec.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError(f"{prefix}mapping.rules must be a list of rule objects, not {shown(rules)}")
    for no, rule in enumerate(rules, 1):
        if not isinstance(rule, dict):
            raise ConfigError(f"{prefix}mapping.rules[{no}] must be an object with 'table', 'regex' or 'template', "
                              f"not {shown(rule)}")
    return rules


def _check_rule(rule: dict[str, Any], where: str) -> None:
    fields = {"name", "local", "domain"}
    if rule.get("case", "keep") not in ("keep", "lower", "upper"):
        raise ConfigError(f"{where}.case must be keep, lower or upper, not {rule['case']!r:.40}")
    if "case_insensitive" in rule and not isinstance(rule["case_insensitive"], bool):
        raise ConfigError(f"{where}.case_insensitive must be true or false")
    if "domain" in rule:
        if not isinstance(rule["domain"], str):
            raise ConfigError(f"{where}.domain must be a string, not {shown(rule['domain'])}")
        if not rule["domain"].isascii():
            raise ConfigError(f"{where}.domain {rule['domain']!a:.60} is not plain ASCII")
    if "table" in rule:
        table = rule["table"]
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ConfigError(f"{where}.table must be an object of identity -> principal (strings)")
        odd = next((k for k in table if not (isinstance(k, str) and k.isascii())), None)
        if odd is not None:
            raise ConfigError(f"{where}.table key {odd!a:.60} is not plain ASCII")
        return
    if "regex" in rule:
        pattern = rule["regex"]
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}.regex must be a string, not {shown(pattern)}")
        try:
            compiled = _compiled(pattern)
        except (re.error, ValueError) as err:  # ValueError: an inline (?u) against re.ASCII
            raise ConfigError(f"{where}.regex {pattern!r:.80} does not compile: {err}") from None
        if not isinstance(rule.get("principal"), str) or not rule["principal"]:
            raise ConfigError(f"{where}.principal (the template of the result) is required with a regex")
        check_template(rule["principal"], fields | set(compiled.groupindex), f"{where}.principal")
        return
    if "template" in rule:
        if not isinstance(rule["template"], str):
            raise ConfigError(f"{where}.template must be a string, not {shown(rule['template'])}")
        check_template(rule["template"], fields, f"{where}.template")
        return
    raise ConfigError(f"{where} has none of 'table', 'regex', 'template'")


def _apply(rule: dict[str, Any], name: str, where: str) -> str | None:
    """The rule's principal for ``name`` or None; the rule has passed ``_check_rule``."""
    case = rule.get("case", "keep")
    if "table" in rule:
        table: dict[str, str] = rule["table"]
        hit = table.get(name)
        if hit is None and rule.get("case_insensitive", True):
            folded = ascii_lower(name)
            hit = next((v for k, v in table.items() if ascii_lower(k) == folded), None)
        return hit
    if "regex" in rule:
        m = _compiled(rule["regex"]).fullmatch(name)
        if not m:
            return None
        values = {**_fields(name), **{k: v or "" for k, v in m.groupdict().items()}}
        return _format(rule["principal"], {k: _case(v, case) for k, v in values.items()}, where)
    fields = _fields(name)
    wanted = rule.get("domain")
    if wanted is not None and ascii_lower(fields["domain"]) != ascii_lower(wanted):
        return None
    return _format(rule["template"], {k: _case(v, case) for k, v in fields.items()}, where)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.ASCII)


def _describe(rule: dict[str, Any]) -> str:
    if "table" in rule:
        return f"table of {len(rule['table']) if isinstance(rule['table'], dict) else '?'} entries"
    if "regex" in rule:
        return f"regex {rule['regex']!r}"
    return f"template {rule.get('template')!r}"


def map_identity(name: str, spec: dict[str, Any]) -> str:
    """The principal for identity ``name``. Raises IdentityError when no rule matches or the result is
    not a safe user principal, ConfigError for malformed rules."""
    validate_name(name, "the identity")  # plain ASCII as given: no look-alike reaches any rule
    rules = _rules(spec)
    for no, rule in enumerate(rules, 1):
        where = f"mapping.rules[{no}]"
        _check_rule(rule, where)  # each rule when it is tried: a bad rule after the matching one is no error here
        result = _apply(rule, name, where)
        if result is None:
            continue
        return normalise_principal(result, f"mapping rule {no} ({_describe(rule)}) turned {name[:80]!r} into")
    tried = "; ".join(f"{no}: {_describe(r)}" for no, r in enumerate(rules, 1)) or "no rules are configured"
    raise IdentityError(f"no mapping rule matches the identity {name[:80]!r} (rules tried: {tried})",
                        code="unmapped_identity")


def normalise_principal(value: str, what: str) -> str:
    """``user@REALM`` with the realm upper-cased (ASCII letters only); raises IdentityError for anything else,
    including any non-ASCII character (refused, not normalised)."""
    user, sep, realm = value.rpartition("@")
    if not value.isascii() or not sep or not _USER_PART.match(user) or not _REALM.match(ascii_upper(realm)) \
            or any(ord(c) < 33 or ord(c) > 126 for c in user):
        raise IdentityError(f"{what} {value[:80]!a}, which is not a valid plain-ASCII user principal (user@REALM)",
                            code="bad_principal")
    return f"{user}@{ascii_upper(realm)}"
