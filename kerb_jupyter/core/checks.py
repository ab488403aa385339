"""Checks of configuration values no loader checks (the source section, templates); each error names its setting."""

from __future__ import annotations

import string
from typing import Any

from .errors import ConfigError

SOURCE_TYPES = ("keytab", "existing_cache", "secretsmanager_keytab", "secretsmanager_password", "broker")
_SOURCE_STRINGS = ("keytab", "cache", "secret_id", "region", "url", "audience", "ca_bundle", "sts_url")


def shown(value: Any) -> str:
    """A value's type and the start of its repr, for an error message."""
    return f"{type(value).__name__} {value!r:.60}"


def check_source(spec: dict[str, Any], label: str) -> None:
    for key in _SOURCE_STRINGS:
        value = spec.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{label}: source.{key} must be a string, not {shown(value)}")
    kind = spec.get("type", "keytab" if spec.get("keytab") else None)
    if kind is not None and kind not in SOURCE_TYPES:
        raise ConfigError(f"{label}: source.type {kind!r:.40} is not one of: {', '.join(SOURCE_TYPES)}")
    if isinstance(spec.get("secret_id"), str):
        check_template(spec["secret_id"], {"user", "principal", "realm"}, f"{label}: source.secret_id")


def check_template(text: str, allowed: set[str], what: str) -> None:
    """A ``str.format`` template that uses only the ``allowed`` field names."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as err:
        raise ConfigError(f"{what} {text!r:.80} is not a valid template: {err}") from None
    bad = sorted({n for n in names if n not in allowed})
    if bad:
        def braces(names: list[str]) -> str:
            return ", ".join("{" + n + "}" for n in names)

        raise ConfigError(f"{what} {text!r:.80} uses {braces(bad)}; allowed: {braces(sorted(allowed))}")
