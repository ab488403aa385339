"""Type and shape checks of the configuration values the server extension uses; each error names its setting."""

from __future__ import annotations

import re
import string
from typing import Any

from .errors import ConfigError

SOURCE_TYPES = ("keytab", "existing_cache", "secretsmanager_keytab", "secretsmanager_password", "broker")
RESOLVERS = ("config", "jupyterhub", "studio_space", "notebook_tag", "sts")
_STRING_KEYS = {
    "source": ("keytab", "cache", "secret_id", "region", "url", "audience", "ca_bundle", "sts_url"),
    "identity": ("user", "region", "metadata_file", "owner_tag", "notebook_arn"),
}


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def check_top_level(raw: Any, label: str) -> None:
    """The top-level paths the shared loader turns into ``Path`` objects without checking their type."""
    if not isinstance(raw, dict):
        return
    for key in ("state_dir", "audit_log"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{label}: {key} must be a path (a string), not {_shown(value)}")


def check_source(spec: dict[str, Any], label: str) -> None:
    _strings(spec, "source", label)
    kind = spec.get("type", "keytab" if spec.get("keytab") else None)
    if kind is not None and kind not in SOURCE_TYPES:
        raise ConfigError(f"{label}: source.type {kind!r:.40} is not one of: {', '.join(SOURCE_TYPES)}")
    if isinstance(spec.get("secret_id"), str):
        _template(spec["secret_id"], {"user", "principal", "realm"}, f"{label}: source.secret_id")


def check_identity(spec: dict[str, Any], label: str) -> None:
    _strings(spec, "identity", label)
    order = spec.get("order")
    if order is None:
        return
    if not isinstance(order, list) or not all(isinstance(x, str) for x in order):
        raise ConfigError(f"{label}: identity.order must be a list of resolver names, not {_shown(order)}")
    unknown = [x for x in order if x not in RESOLVERS]
    if unknown:
        raise ConfigError(f"{label}: identity.order: unknown resolver(s) {', '.join(unknown)}; "
                          f"known: {', '.join(RESOLVERS)}")


def check_mapping(spec: dict[str, Any], label: str) -> None:
    rules = spec.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError(f"{label}: mapping.rules must be a list of rule objects, not {_shown(rules)}")
    for no, rule in enumerate(rules, 1):
        where = f"{label}: mapping.rules[{no}]"
        if not isinstance(rule, dict):
            raise ConfigError(f"{where} must be an object with 'table', 'regex' or 'template', not {_shown(rule)}")
        _rule(rule, where)


def _rule(rule: dict[str, Any], where: str) -> None:
    fields = {"name", "local", "domain"}
    if rule.get("case", "keep") not in ("keep", "lower", "upper"):
        raise ConfigError(f"{where}.case must be keep, lower or upper, not {rule['case']!r:.40}")
    if "case_insensitive" in rule and not isinstance(rule["case_insensitive"], bool):
        raise ConfigError(f"{where}.case_insensitive must be true or false")
    if "domain" in rule and not isinstance(rule["domain"], str):
        raise ConfigError(f"{where}.domain must be a string, not {_shown(rule['domain'])}")
    if "table" in rule:
        table = rule["table"]
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ConfigError(f"{where}.table must be an object of identity -> principal (strings)")
        return
    if "regex" in rule:
        pattern = rule["regex"]
        if not isinstance(pattern, str):
            raise ConfigError(f"{where}.regex must be a string, not {_shown(pattern)}")
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"{where}.regex {pattern!r:.80} does not compile: {err}") from None
        if not isinstance(rule.get("principal"), str) or not rule["principal"]:
            raise ConfigError(f"{where}.principal (the template of the result) is required with a regex")
        _template(rule["principal"], fields | set(compiled.groupindex), f"{where}.principal")
        return
    if "template" in rule:
        if not isinstance(rule["template"], str):
            raise ConfigError(f"{where}.template must be a string, not {_shown(rule['template'])}")
        _template(rule["template"], fields, f"{where}.template")
        return
    raise ConfigError(f"{where} has none of 'table', 'regex', 'template'")


def _strings(spec: dict[str, Any], section: str, label: str) -> None:
    for key in _STRING_KEYS[section]:
        value = spec.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{label}: {section}.{key} must be a string, not {_shown(value)}")


def _template(text: str, allowed: set[str], what: str) -> None:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as err:
        raise ConfigError(f"{what} {text!r:.80} is not a valid template: {err}") from None
    bad = sorted({n for n in names if n not in allowed})
    if bad:
        def braces(names: list[str]) -> str:
            return ", ".join("{" + n + "}" for n in names)

        raise ConfigError(f"{what} {text!r:.80} uses {braces(bad)}; allowed: {braces(sorted(allowed))}")
