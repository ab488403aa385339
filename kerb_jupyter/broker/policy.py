"""Who gets which tickets: deny-by-default rules from a verified caller ARN to a principal and its clusters.

    "policy": {"rules": [{
        "name": "analysts", "account": "123456789012", "role": "AWSReservedSSO_Analysts_*",
        "identity_from": "session", "mapping": {"rules": [{"template": "{local}@CORP.EXAMPLE.COM"}]},
        "clusters": ["analytics"], "groups": {"CN=Sales,OU=Groups,DC=corp,DC=example,DC=com": ["sales"]},
        "source_cidrs": ["10.0.0.0/8"], "hours": [{"days": "mon-fri", "from": "06:00", "to": "20:00"}],
        "max_lifetime": 3600}]}

The first rule whose account, role and session patterns match the caller decides; no match is a refusal.
``identity_from`` names the ARN part fed to the mapping rules (kerb_jupyter.core.mapping). A rule whose identity
is a part the caller chooses (a session name outside IAM Identity Center, any part under a wildcard account)
is refused at load unless it says ``"trust_caller_chosen": true``. Hours are UTC.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import ConfigError, IdentityError, KerbJupyterError
from ..core.mapping import map_identity, validate_spec
from .auth import Caller
from .groups import Membership

log = logging.getLogger(__name__)

_RULE_KEYS = {"name", "account", "role", "session", "role_id", "identity_from", "trust_caller_chosen", "mapping",
              "clusters", "groups", "source_cidrs", "hours", "max_lifetime"}
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
# IAM Identity Center sets the session name of its permission-set roles to the user's sign-in name.
SSO_ROLE_PREFIX = "AWSReservedSSO_"

GroupLookup = Callable[[str], Awaitable[Membership]]


class Denied(KerbJupyterError):
    """The policy refuses the caller; ``code`` is the audited reason."""

    code = "denied"


@dataclass(frozen=True)
class Window:
    days: frozenset[int]
    start: int  # minutes after midnight, UTC
    end: int

    def contains(self, ts: float) -> bool:
        t = time.gmtime(ts)
        minute = t.tm_hour * 60 + t.tm_min
        if self.start <= self.end:
            return t.tm_wday in self.days and self.start <= minute < self.end
        # Past midnight: the evening belongs to the listed day, the early morning to the day after it.
        if minute >= self.start:
            return t.tm_wday in self.days
        return minute < self.end and (t.tm_wday - 1) % 7 in self.days


@dataclass(frozen=True)
class Rule:
    name: str
    account: str
    role: str
    session: str
    identity_from: str
    mapping: dict[str, Any]
    clusters: tuple[str, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    role_id: str | None = None
    source_cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hours: tuple[Window, ...] = ()
    max_lifetime: int | None = None
    trust_caller_chosen: bool = False

    def matches(self, caller: Caller) -> bool:
        if not fnmatch.fnmatchcase(caller.account, self.account):
            return False
        if caller.kind == "user":
            return self.identity_from == "user" and fnmatch.fnmatchcase(caller.session, self.session)
        return (self.identity_from != "user" and fnmatch.fnmatchcase(caller.role, self.role)
                and fnmatch.fnmatchcase(caller.session, self.session))


@dataclass(frozen=True)
class Decision:
    rule: str
    principal: str
    clusters: dict[str, str]  # name -> service principal
    lifetime: int


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    clusters: dict[str, str]
    max_lifetime: int

    async def decide(self, caller: Caller, source: str, groups_of: GroupLookup | None = None,
                     now: float | None = None, rename: bool = False) -> Decision:
        """The decision for a verified caller from address ``source``. Raises Denied with the reason as code.

        ``groups_of`` asks the directory (for rules with group conditions, or for every rule with ``rename``);
        the principal becomes the directory's own name for the user when it gives one.
        """
        now = time.time() if now is None else now
        rule = next((r for r in self.rules if r.matches(caller)), None)
        if rule is None:
            raise Denied(f"no policy rule matches {caller.arn}", code="no_rule")
        if rule.role_id and caller.user_id.split(":", 1)[0] != rule.role_id:
            raise Denied(f"rule {rule.name}: the role's unique id is not {rule.role_id}", code="no_rule")
        if rule.source_cidrs and not _in_ranges(source, rule.source_cidrs):
            raise Denied(f"rule {rule.name}: source address {source} is outside the allowed ranges",
                         code="source_address")
        if rule.hours and not any(w.contains(now) for w in rule.hours):
            raise Denied(f"rule {rule.name}: outside the allowed hours", code="time_window")
        name = {"session": caller.session, "role": caller.role, "user": caller.session}[rule.identity_from]
        try:
            principal = map_identity(name, rule.mapping)
        except IdentityError as err:
            raise Denied(f"rule {rule.name}: {err}", code="unmapped") from None
        granted = list(rule.clusters)
        if rule.groups and groups_of is None:
            raise Denied(f"rule {rule.name}: group conditions need the ldap settings", code="no_group")
        if groups_of is not None and (rule.groups or rename):
            found = await groups_of(principal)
            principal = found.principal or principal
            member = {g.lower() for g in found.groups}
            for group, names in rule.groups.items():
                if group.lower() in member:
                    granted.extend(n for n in names if n not in granted)
        if not granted:
            raise Denied(f"rule {rule.name}: {principal} is in no group that grants a cluster", code="no_group")
        lifetime = min(self.max_lifetime, rule.max_lifetime or self.max_lifetime)
        return Decision(rule.name, principal, {n: self.clusters[n] for n in granted}, lifetime)


def _in_ranges(source: str, ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(source)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in ranges)


def parse_policy(spec: Any, clusters: dict[str, str], max_lifetime: int) -> Policy:
    """Validate the ``policy`` section. Raises ConfigError naming the rule and key at fault."""
    if not isinstance(spec, dict) or not isinstance(spec.get("rules"), list):
        raise ConfigError("policy must be an object with a 'rules' list")
    rules = tuple(_rule(raw, no, clusters) for no, raw in enumerate(spec["rules"], 1))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ConfigError("policy: rule names must be unique")
    return Policy(rules, dict(clusters), max_lifetime)


def _rule(raw: Any, no: int, clusters: dict[str, str]) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"policy rule {no} must be an object")
    where = f"policy rule {no} ({str(raw.get('name', ''))[:40]})"
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_RULE_KEYS))}")
    for key in ("account", "identity_from", "mapping"):
        if key not in raw:
            raise ConfigError(f"{where}: '{key}' is required")
    ident = raw["identity_from"]
    if ident not in ("session", "role", "user"):
        raise ConfigError(f"{where}: identity_from must be session, role or user")
    for key in ("account", "role", "session", "name", "role_id"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{where}: '{key}' must be a string")
    if not isinstance(raw["mapping"], dict) or not isinstance(raw["mapping"].get("rules"), list):
        raise ConfigError(f"{where}: 'mapping' must be an object with a 'rules' list (see kerb_jupyter.core.mapping)")
    validate_spec(raw["mapping"], where)  # an uncompilable regex, an unknown field: refused here, not per request
    names = _names(raw.get("clusters", []), where + ".clusters", clusters)
    groups_raw = raw.get("groups", {})
    if not isinstance(groups_raw, dict):
        raise ConfigError(f"{where}: 'groups' must be an object of group DN -> cluster names")
    groups = {str(g): _names(v, f"{where}.groups[{str(g)[:40]}]", clusters) for g, v in groups_raw.items()}
    trusted = raw.get("trust_caller_chosen", False)
    if not isinstance(trusted, bool):
        raise ConfigError(f"{where}: trust_caller_chosen must be true or false")
    rule = Rule(
        name=str(raw.get("name") or f"rule{no}"), account=raw["account"], role=raw.get("role", "*"),
        session=raw.get("session", "*"), identity_from=ident, mapping=raw["mapping"], clusters=names,
        groups=groups, role_id=raw.get("role_id"), source_cidrs=_cidrs(raw.get("source_cidrs", []), where),
        hours=tuple(_window(w, where) for w in _list(raw.get("hours", []), where + ".hours")),
        max_lifetime=_lifetime(raw.get("max_lifetime"), where), trust_caller_chosen=trusted,
    )
    chosen = caller_chosen(rule)
    if chosen and not trusted:
        raise ConfigError(f"{where}: {chosen}; refused unless the rule says \"trust_caller_chosen\": true "
                          "(see the README's trust model)")
    if chosen:
        log.warning("broker policy %s: trusting a caller-chosen identity as configured: %s", rule.name, chosen)
    return rule


def caller_chosen(rule: Rule) -> str:
    """Why ``rule``'s identity would be chosen by the caller rather than enforced by AWS ('' if it is not)."""
    if not re.fullmatch(r"\d{12}", rule.account):
        return f"account {rule.account!r} is not one fixed account: anyone can make roles of any name elsewhere"
    if rule.identity_from == "session":
        fixed_prefix = re.split(r"[*?\[]", rule.role, maxsplit=1)[0]
        if not fixed_prefix.startswith(SSO_ROLE_PREFIX):
            return (f"the session name of role {rule.role!r} is chosen by whoever calls AssumeRole (only IAM "
                    f"Identity Center's {SSO_ROLE_PREFIX}* roles get the user's name from AWS)")
    return ""


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where} must be a list")
    return value


def _names(value: Any, where: str, clusters: dict[str, str]) -> tuple[str, ...]:
    names = _list(value, where)
    unknown = [str(n) for n in names if n not in clusters]
    if unknown:
        raise ConfigError(f"{where}: unknown cluster(s) {', '.join(unknown)}; configured: {', '.join(clusters)}")
    return tuple(str(n) for n in names)


def _cidrs(value: Any, where: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(str(c), strict=False) for c in _list(value, where + ".source_cidrs"))
    except ValueError as err:
        raise ConfigError(f"{where}.source_cidrs: {err}") from None


def _window(raw: Any, where: str) -> Window:
    if not isinstance(raw, dict) or set(raw) - {"days", "from", "to"}:
        raise ConfigError(f"{where}.hours: each window is {{\"days\": \"mon-fri\", \"from\": \"HH:MM\", \"to\": ...}}")
    minutes = []
    for key in ("from", "to"):
        m = _HHMM.match(str(raw.get(key, "")))
        if not m:
            raise ConfigError(f"{where}.hours.{key} must be HH:MM (UTC)")
        minutes.append(int(m[1]) * 60 + int(m[2]))
    return Window(_days(str(raw.get("days", "mon-sun")), where), minutes[0], minutes[1])


def _days(text: str, where: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.lower().split(","):
        first, _, last = part.strip().partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise ConfigError(f"{where}.hours.days: {text!r} is not like 'mon-fri' or 'sat,sun'")
        a, b = _DAYS.index(first), _DAYS.index(last or first)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(days)


def _lifetime(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 60:
        raise ConfigError(f"{where}.max_lifetime must be a whole number of seconds >= 60")
    return value
