"""The shared configuration file both the server extension and the kernels read (no server imports).

One JSON document, found at ``$KERB_JUPYTER_CONFIG`` or ``~/.jupyter/kerb_jupyter.json``::

    {
      "principal": "alice@CORP.EXAMPLE.COM",          # optional when identity + mapping are given
      "source": {"type": "keytab", "keytab": "/home/alice/alice.keytab"},
      "state_dir": "/run/user/1000/kerb_jupyter",     # where the shared cache + state live
      "clusters": {
        "analytics": {"host": "db.cluster-x.rds.amazonaws.com", "port": 5432, "dbname": "analytics"}
      }
    }

Every error names the file and the key at fault. A cluster's ``options`` (extra libpq parameters) may not set
what carries the security model or what the cluster has as settings of its own (``FORBIDDEN_OPTIONS``), and
must be parameters libpq knows: a bad one is that cluster's ``error`` (shown by the clusters list and the
check; connecting refuses), the rest of the configuration still loads.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .checks import shown
from .errors import ConfigError, UnknownClusterError
from .identity import validate_spec as validate_identity_spec

ENV_CONFIG = "KERB_JUPYTER_CONFIG"
ENV_STATE_DIR = "KERB_JUPYTER_STATE_DIR"
CACHE_NAME = "krb5cc"
STATE_NAME = "state.json"

_TOP_KEYS = {"principal", "source", "identity", "mapping", "state_dir", "clusters", "keeper", "audit_log"}
_CLUSTER_KEYS = {
    "host", "port", "dbname", "user", "krbsrvname", "gssencmode", "sslmode", "connect_timeout",
    "options", "tagging", "description",
}
_GSSENC = {"disable", "prefer", "require"}
_SSL = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PRINCIPAL = re.compile(r"^[^\s@/\\\"'`;]+(/[^\s@/\\\"'`;]+)?@[A-Z0-9][A-Z0-9.-]*$", re.ASCII)
# libpq parameters a cluster's "options" may not set: they carry the security model (GSSAPI only, no password,
# no credential delegation to the server) or are the cluster's own settings (two places must never disagree).
FORBIDDEN_OPTIONS = frozenset({
    "require_auth", "gssencmode", "krbsrvname", "gsslib", "gssdelegation", "service", "passfile", "password",
    "user", "host", "port", "dbname", "sslmode", "connect_timeout",
})


@dataclass(frozen=True)
class ClusterConfig:
    """How to reach one PostgreSQL / Aurora cluster. ``user`` defaults to the ticket's principal."""

    name: str
    host: str
    port: int = 5432
    dbname: str = "postgres"
    user: str | None = None
    krbsrvname: str = "postgres"
    gssencmode: str = "prefer"
    sslmode: str = "prefer"
    connect_timeout: int = 10
    options: dict[str, str] = field(default_factory=dict)
    tagging: bool = True
    description: str = ""
    error: str | None = None  # why this cluster cannot be used (a refused option): connecting raises it

    def public(self) -> dict[str, Any]:
        """The non-secret connection details (everything here is non-secret by construction)."""
        return {
            "name": self.name, "host": self.host, "port": self.port, "dbname": self.dbname,
            "user": self.user, "krbsrvname": self.krbsrvname, "gssencmode": self.gssencmode,
            "sslmode": self.sslmode, "description": self.description, "error": self.error,
        }


@dataclass(frozen=True)
class Settings:
    path: Path | None
    principal: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    mapping: dict[str, Any] = field(default_factory=dict)
    keeper: dict[str, Any] = field(default_factory=dict)
    state_dir: Path = field(default_factory=lambda: default_state_dir())
    clusters: dict[str, ClusterConfig] = field(default_factory=dict)
    audit_log: Path | None = None

    @cached_property
    def cache_path(self) -> Path:
        return self.state_dir / CACHE_NAME

    @cached_property
    def state_path(self) -> Path:
        return self.state_dir / STATE_NAME

    def cluster(self, name: str) -> ClusterConfig:
        """Raises UnknownClusterError naming the configured clusters."""
        try:
            return self.clusters[name]
        except KeyError:
            raise UnknownClusterError(name, list(self.clusters)) from None


def default_config_path() -> Path:
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".jupyter" / "kerb_jupyter.json"


def default_state_dir() -> Path:
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "kerb_jupyter"
    return Path.home() / ".local" / "state" / "kerb_jupyter"


def load_settings(path: str | Path | None = None, *, required: bool = False) -> Settings:
    """Read and validate the configuration file.

    A missing file gives empty settings unless ``required``. Raises ConfigError for anything malformed.
    """
    cfg_path = Path(path).expanduser() if path else default_config_path()
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        if required or path:
            raise ConfigError(f"the kerb_jupyter configuration {cfg_path} does not exist") from None
        return Settings(path=None)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_path} is not valid JSON: {err.msg} at line {err.lineno}") from None
    except OSError as err:
        raise ConfigError(f"cannot read {cfg_path}: {err.strerror}") from None
    return parse_settings(raw, cfg_path)


def parse_settings(raw: Any, where: Path | None = None) -> Settings:
    label = str(where) if where else "the configuration"
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: the top level must be a JSON object")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{label}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_TOP_KEYS))}")
    principal = raw.get("principal")
    if principal is not None:
        principal = validate_principal(principal, f"{label}: principal")
    clusters_raw = raw.get("clusters", {})
    if not isinstance(clusters_raw, dict):
        raise ConfigError(f"{label}: 'clusters' must be an object of name -> settings")
    clusters = {name: _cluster(name, spec, label) for name, spec in clusters_raw.items()}
    sections = {}
    for key in ("source", "identity", "mapping", "keeper"):
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{label}: '{key}' must be an object")
        sections[key] = value
    try:
        validate_identity_spec(sections["identity"])
    except ConfigError as err:
        raise ConfigError(f"{label}: {err}") from None
    for key in ("state_dir", "audit_log"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{label}: {key} must be a path (a string), not {shown(raw[key])}")
    state_dir = Path(raw["state_dir"]).expanduser() if raw.get("state_dir") else default_state_dir()
    audit = Path(raw["audit_log"]).expanduser() if raw.get("audit_log") else None
    return Settings(path=where, principal=principal, state_dir=state_dir, clusters=clusters,
                    audit_log=audit, **sections)


def validate_principal(value: Any, what: str) -> str:
    """A ``user@REALM`` (or ``user/instance@REALM``) principal with an upper-case realm."""
    if not isinstance(value, str) or not value.isascii() or not _PRINCIPAL.match(value) or len(value) > 256:
        raise ConfigError(f"{what}: {value!r:.80} is not a Kerberos principal of the form user@REALM "
                          "(realm in upper case)")
    return value


def _cluster(name: Any, spec: Any, label: str) -> ClusterConfig:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{label}: cluster name {name!r:.80} must be 1-63 letters, digits, '_', '-' or '.'")
    where = f"{label}: clusters.{name}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object")
    unknown = sorted(set(spec) - _CLUSTER_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_CLUSTER_KEYS))}")
    if not isinstance(spec.get("host"), str) or not spec["host"]:
        raise ConfigError(f"{where}.host is required (the cluster endpoint's host name)")
    port = spec.get("port", 5432)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"{where}.port must be a number from 1 to 65535, not {port!r:.40}")
    for key, allowed in (("gssencmode", _GSSENC), ("sslmode", _SSL)):
        if key in spec and (not isinstance(spec[key], str) or spec[key] not in allowed):
            raise ConfigError(f"{where}.{key} must be one of {', '.join(sorted(allowed))}, not {spec[key]!r:.40}")
    timeout = spec.get("connect_timeout", 10)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 1:
        raise ConfigError(f"{where}.connect_timeout must be a whole number of seconds >= 1")
    options = spec.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                                for v in options.values()):
        raise ConfigError(f"{where}.options must be an object of libpq parameter -> value")
    for key in ("host", "dbname", "user", "krbsrvname", "description"):
        if key in spec and not isinstance(spec[key], str):
            raise ConfigError(f"{where}.{key} must be a string")
        if "\x00" in spec.get(key, ""):
            raise ConfigError(f"{where}.{key} contains a NUL character")
    if "tagging" in spec and not isinstance(spec["tagging"], bool):
        raise ConfigError(f"{where}.tagging must be true or false")
    fields = {k: v for k, v in spec.items() if k != "options"}
    error = option_error(options, f"clusters.{name}.options")
    return ClusterConfig(name=name, options={} if error else {k: str(v) for k, v in options.items()}, error=error,
                         **fields)


def option_error(options: dict[str, Any], where: str) -> str | None:
    """Why these extra libpq parameters are refused (naming the first bad key), or None when they are fine."""
    for key, value in sorted(options.items()):
        if key in FORBIDDEN_OPTIONS:
            return (f"{where}.{key} is not allowed: {key} is set by the cluster's own settings or by kerb_jupyter "
                    f"(options may not set {', '.join(sorted(FORBIDDEN_OPTIONS))})")
        if key not in _libpq_keywords():
            return f"{where}.{key} is not a libpq connection parameter"
        if "\x00" in str(value):
            return f"{where}.{key} contains a NUL character"
    return None


@functools.cache
def _libpq_keywords() -> frozenset[str]:
    import psycopg

    return frozenset(opt.keyword.decode() for opt in psycopg.pq.Conninfo.get_defaults())
