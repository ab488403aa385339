"""Connections to configured clusters over GSSAPI, using the shared ticket cache (no IPython imports).

A ``Session`` keeps one connection per cluster, checks the ticket before connecting, reconnects once
when a connection died (server restart, failover), and turns libpq's GSS messages into sentences that
say what to do.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..core import tickets
from ..core.config import ClusterConfig, Settings
from ..core.errors import ConfigError, DatabaseError, KerbJupyterError, NoTicketError, TicketError, TicketExpiredError
from ..core.grants import require_grant
from ..core.state import cache_path, keeper_state
from ..core.tagging import application_name


def _hhmm(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "?"


def check_ticket(settings: Settings) -> tickets.TicketInfo:
    """The valid ticket in the shared cache, or an error that says why and what the keeper reports."""
    try:
        return tickets.read_cache(cache_path(settings))
    except TicketError as err:
        state = keeper_state(settings)
        extra = ""
        if state and state.get("last_error"):
            e = state["last_error"]
            extra = f"; the server's keeper reports: {e.get('message')} (since {e.get('at', '?')})"
        elif state:
            extra = f"; the server's keeper state is {state.get('state')!r}"
        else:
            extra = "; no keeper state found: is the kerb_jupyter server extension running?"
        raise type(err)(f"{err}{extra}") from None


@dataclass
class Session:
    """One kernel's connections, one per cluster."""

    settings: Settings
    connections: dict[str, psycopg.Connection[Any]] = field(default_factory=dict)

    def connection(self, name: str) -> psycopg.Connection[Any]:
        """An open connection to cluster ``name``; reconnects if the old one is closed or broken."""
        cluster = self.settings.cluster(name)
        conn = self.connections.get(name)
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.connections.pop(name, None)
        info = check_ticket(self.settings)
        require_grant(info, cluster, keeper_state(self.settings))  # a broker cache: the cluster's grant
        conn = connect(cluster, info.principal, self.settings)
        self.connections[name] = conn
        return conn

    def reconfigure(self, settings: Settings) -> None:
        """New settings: connections to clusters whose definition changed or vanished are closed."""
        for name in list(self.connections):
            if settings.clusters.get(name) != self.settings.clusters.get(name):
                self.discard(name)
        self.settings = settings

    def discard(self, name: str) -> None:
        conn = self.connections.pop(name, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for name in list(self.connections):
            self.discard(name)


def conninfo(cluster: ClusterConfig, principal: str) -> dict[str, Any]:
    """libpq parameters for ``cluster``. Raises ConfigError when the cluster's configuration was refused (its
    ``error``: a forbidden or unknown option), so nothing connects with settings that undo GSSAPI."""
    if cluster.error:
        raise ConfigError(f"cluster {cluster.name!r} cannot be used: {cluster.error}")
    params: dict[str, Any] = {
        "host": cluster.host,
        "port": cluster.port,
        "dbname": cluster.dbname,
        "user": cluster.user or principal,
        "krbsrvname": cluster.krbsrvname,
        "gssencmode": cluster.gssencmode,  # always explicit: binary libpq defaults to disable
        "sslmode": cluster.sslmode,
        "connect_timeout": cluster.connect_timeout,
        "require_auth": "gss",  # never fall back to a password prompt
        "application_name": application_name(principal) if cluster.tagging else "kerb_jupyter",
    }
    # Options never override the keys above (the configuration refuses them; this keeps it true for any caller).
    params.update({k: v for k, v in cluster.options.items() if k not in params})
    return params


def connect(cluster: ClusterConfig, principal: str, settings: Settings | None = None) -> psycopg.Connection[Any]:
    """Open an autocommit connection. Raises TicketError or DatabaseError with an actionable message."""
    if settings is not None and not os.environ.get("KRB5CCNAME"):
        # A kernel the server did not start (nbclient, papermill) has no KRB5CCNAME: libpq would look in the
        # default cache, not the shared one that check_ticket just read.
        os.environ["KRB5CCNAME"] = f"FILE:{settings.cache_path}"
    try:
        return psycopg.connect(**conninfo(cluster, principal), autocommit=True)
    except psycopg.Error as err:  # OperationalError, and ProgrammingError for parameters libpq refuses
        raise classify_connect_error(err, cluster, principal) from None


def classify_connect_error(err: psycopg.Error, cluster: ClusterConfig, principal: str) -> KerbJupyterError:
    text = str(err).strip()
    first = text.splitlines()[-1] if text else type(err).__name__
    where = f"cluster {cluster.name!r} ({cluster.host}:{cluster.port})"
    if "Ticket expired" in text:
        return TicketExpiredError(f"the ticket for {principal} has expired; cannot connect to {where}")
    if "No Kerberos credentials" in text or "No credentials cache found" in text:
        return NoTicketError(f"no Kerberos ticket for {principal} in the shared cache; cannot connect to {where}")
    if "not found in Kerberos database" in text:
        return DatabaseError(
            f"{where}: the KDC does not know the service principal {cluster.krbsrvname}/{cluster.host}; "
            "check the host name (use the name the service principal was made for) and krbsrvname",
            code="service_unknown")
    if "Cannot contact any KDC" in text:
        return TicketError(f"cannot reach the KDC to get a service ticket for {where}", code="kdc_unreachable")
    refused = ("GSSAPI authentication failed", "does not match", "no pg_hba.conf entry")
    if any(r in text for r in refused) or ("role" in text and "does not exist" in text):
        return DatabaseError(f"{where} refused {principal}: {first}", code="auth_failed")
    if "Connection refused" in text or "could not translate host name" in text or "timeout expired" in text:
        return DatabaseError(f"cannot reach {where}: {first}", code="db_unreachable")
    return DatabaseError(f"cannot connect to {where}: {first}", code="connect_failed")


def sqlalchemy_engine(settings: Settings, name: str, **kwargs: Any) -> Any:
    """A SQLAlchemy engine for cluster ``name`` whose every new connection uses the current shared ticket.

    Usable with ``pandas.read_sql``. Raises UnknownClusterError; connection errors surface when it connects.
    """
    import sqlalchemy

    cluster = settings.cluster(name)

    def creator() -> psycopg.Connection[Any]:
        info = check_ticket(settings)
        conn = psycopg.connect(**conninfo(cluster, info.principal))
        return conn

    kwargs.setdefault("pool_pre_ping", True)
    return sqlalchemy.create_engine("postgresql+psycopg://", creator=creator, **kwargs)
