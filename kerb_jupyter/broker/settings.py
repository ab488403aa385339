"""The broker's configuration file (broker.json), validated into typed settings; the policy reloads on SIGHUP.

    {
      "listen": {"address": "0.0.0.0", "port": 8443, "tls_cert": "/etc/broker/cert.pem", "tls_key": "..."},
      "audience": "kerb-jupyter-broker.corp.example.com",
      "sts": {"endpoint": "https://sts.eu-west-1.amazonaws.com/", "host": "sts.eu-west-1.amazonaws.com",
              "region": "eu-west-1", "timeout": 5, "max_clients": 100},
      "kerberos": {"principal": "svc-broker@CORP.EXAMPLE.COM", "keytab": "/etc/broker/broker.keytab",
                   "max_lifetime": 36000},
      "clusters": {"analytics": "postgres/analytics.cluster-x.eu-west-1.rds.amazonaws.com@CORP.EXAMPLE.COM"},
      "ldap": {...}, "limits": {...}, "store": "memory", "audit_log": "/var/log/kerb-jupyter/broker.jsonl",
      "policy": {"rules": [...]}
    }
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core.errors import ConfigError
from .groups import LdapSettings, parse_ldap
from .policy import Policy, parse_policy

log = logging.getLogger(__name__)

_TOP = {"listen", "audience", "sts", "kerberos", "clusters", "ldap", "limits", "store", "audit_log", "policy"}
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_SPN = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+@[A-Z0-9][A-Z0-9.-]*$")
LIMIT_DEFAULTS = {
    "per_principal": [30, 60.0], "per_arn": [30, 60.0], "per_source": [120, 60.0],
    "issues_per_principal_hour": 120, "max_body": 16384,
}


@dataclass(frozen=True)
class Limits:
    per_principal: tuple[int, float] = (30, 60.0)
    per_arn: tuple[int, float] = (30, 60.0)
    per_source: tuple[int, float] = (120, 60.0)
    issues_per_principal_hour: int = 120
    max_body: int = 16384


@dataclass(frozen=True)
class BrokerSettings:
    path: Path | None
    audience: str
    sts_endpoint: str
    sts_host: str
    sts_region: str
    keytab: Path
    service_principal: str
    clusters: dict[str, str]
    policy: Policy
    address: str = "127.0.0.1"
    port: int = 8443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    sts_timeout: float = 5.0
    sts_max_clients: int = 100
    max_lifetime: int = 36000
    ldap: LdapSettings | None = None
    limits: Limits = field(default_factory=Limits)
    store: str | None = None
    audit_log: Path | None = None


def load_broker_settings(path: str | Path) -> BrokerSettings:
    """Read and validate broker.json. Raises ConfigError naming the file and key at fault."""
    p = Path(path).expanduser()
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"the broker configuration {p} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p} is not valid JSON: {err.msg} at line {err.lineno}") from None
    except OSError as err:
        raise ConfigError(f"cannot read {p}: {err.strerror}") from None
    try:
        return parse_broker_settings(raw, p)
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from None


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"'{key}' must be an object")
    return value


def parse_broker_settings(raw: Any, where: Path | None = None) -> BrokerSettings:
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a JSON object")
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP))}")
    listen, sts, krb = _section(raw, "listen"), _section(raw, "sts"), _section(raw, "kerberos")
    audience = raw.get("audience")
    if not isinstance(audience, str) or not 3 <= len(audience) <= 200 or not audience.isprintable():
        raise ConfigError("'audience' is required: the name notebooks sign for, e.g. the broker's DNS name")
    endpoint = str(sts.get("endpoint", ""))
    if not endpoint.startswith(("https://", "http://")):
        raise ConfigError("sts.endpoint is required: the STS URL the broker forwards to (https://sts.REGION...)")
    host = str(sts.get("host") or urlsplit(endpoint).netloc)
    region = sts.get("region") or sts_region(host)
    if not isinstance(region, str) or not _REGION.match(region):
        raise ConfigError(f"sts.region is required when the STS host {host!r:.80} names no region: the region "
                          "notebooks sign for, e.g. eu-west-1")
    if not krb.get("keytab") or not krb.get("principal"):
        raise ConfigError("kerberos.keytab and kerberos.principal (the broker's service principal) are required")
    clusters = raw.get("clusters", {})
    if not isinstance(clusters, dict) or not clusters:
        raise ConfigError("'clusters' must name at least one cluster: name -> service principal")
    for name, spn in clusters.items():
        if not isinstance(spn, str) or not _SPN.match(spn):
            raise ConfigError(f"clusters.{name}: {spn!r:.80} is not a service principal like postgres/host@REALM")
    max_life = _int(krb.get("max_lifetime", 36000), "kerberos.max_lifetime", 60)
    tls_cert, tls_key = listen.get("tls_cert"), listen.get("tls_key")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("listen.tls_cert and listen.tls_key go together")
    address = str(listen.get("address", "127.0.0.1"))
    if not tls_cert and not is_loopback(address):
        raise ConfigError(f"listen.address {address} is not loopback: TLS is required (listen.tls_cert/tls_key)")
    return BrokerSettings(
        path=where, audience=audience, sts_endpoint=endpoint, sts_host=host, sts_region=region,
        keytab=Path(str(krb["keytab"])), service_principal=str(krb["principal"]), clusters=dict(clusters),
        policy=parse_policy(raw.get("policy"), clusters, max_life), address=address,
        port=_int(listen.get("port", 8443), "listen.port", 0), tls_cert=Path(tls_cert) if tls_cert else None,
        tls_key=Path(tls_key) if tls_key else None, sts_timeout=_seconds(sts.get("timeout", 5.0), "sts.timeout"),
        sts_max_clients=_int(sts.get("max_clients", 100), "sts.max_clients", 1),
        max_lifetime=max_life, ldap=parse_ldap(raw.get("ldap")), limits=_limits(_section(raw, "limits")),
        store=raw.get("store"), audit_log=Path(raw["audit_log"]) if raw.get("audit_log") else None,
    )


def _int(value: Any, what: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{what} must be a whole number >= {minimum}")
    return value


def _seconds(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 300:
        raise ConfigError(f"{what} must be a number of seconds, more than 0 and at most 300")
    return float(value)


def _limits(raw: dict[str, Any]) -> Limits:
    unknown = sorted(set(raw) - set(LIMIT_DEFAULTS))
    if unknown:
        raise ConfigError(f"limits: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(LIMIT_DEFAULTS)}")
    pairs = {}
    for key in ("per_principal", "per_arn", "per_source"):
        value = raw.get(key, LIMIT_DEFAULTS[key])
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int) and value[0] > 0
                and isinstance(value[1], int | float) and value[1] > 0):
            raise ConfigError(f"limits.{key} must be [count, seconds], e.g. [30, 60]")
        pairs[key] = (int(value[0]), float(value[1]))
    return Limits(**pairs, issues_per_principal_hour=_int(raw.get("issues_per_principal_hour", 120),
                                                          "limits.issues_per_principal_hour", 1),
                  max_body=_int(raw.get("max_body", 16384), "limits.max_body", 1024))


def sts_region(host: str) -> str | None:
    """The signing region of an AWS STS host name (regional, FIPS, VPC endpoint; the global one is us-east-1)."""
    name = host.rsplit(":", 1)[0].lower()
    if name == "sts.amazonaws.com":
        return "us-east-1"
    m = re.search(r"(?:^|\.)sts(?:-fips)?\.([a-z]{2}(?:-[a-z]+)+-\d+)\.(?:vpce\.)?amazonaws\.com(?:\.cn)?$", name)
    return m[1] if m else None


def is_loopback(address: str) -> bool:
    return address in ("localhost", "::1") or address.startswith("127.")


class PolicyHolder:
    """The policy in force; ``reload()`` (on SIGHUP) swaps in the file's new policy only if it is valid."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.policy = settings.policy
        self.last_error: str | None = None

    def reload(self) -> bool:
        """Re-read the policy from the configuration file; on any error keep the current one. True if swapped."""
        if self.settings.path is None:
            return False
        try:
            fresh = load_broker_settings(self.settings.path)
        except ConfigError as err:
            self.last_error = str(err)
            log.error("broker: the new policy is refused, the previous one stays in force: %s", err)
            return False
        self.policy, self.last_error = fresh.policy, None
        log.info("broker: policy reloaded from %s (%d rules)", self.settings.path, len(fresh.policy.rules))
        return True
