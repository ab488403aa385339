"""A throwaway Kerberos realm plus PostgreSQL cluster(s) on loopback, for the demo and the tests.

    with Sandbox(tmpdir) as sb:
        sb.describe()   # {"env": {...}, "clusters": [...], "principal": "alice@KERB.TEST"}

Everything it starts is stopped on exit; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .postgres import Postgres
from .procs import Lifecycle
from .realm import Realm

__all__ = ["BaseSandbox", "Postgres", "Realm", "Sandbox", "write_json"]

DEMO_SQL = """
CREATE TABLE IF NOT EXISTS trips (
    id integer PRIMARY KEY,
    started_at timestamptz NOT NULL,
    city text NOT NULL,
    distance_km numeric(8, 2) NOT NULL,
    fare double precision NOT NULL,
    passengers smallint NOT NULL,
    paid boolean NOT NULL
);
INSERT INTO trips
SELECT i,
       timestamptz '2026-01-01 00:00+00' + i * interval '17 minutes',
       (ARRAY['Seattle', 'Dublin', 'Sydney', 'Tokyo', 'Frankfurt'])[1 + i % 5],
       round((1 + (i * 7919 % 400) / 10.0)::numeric, 2),
       3.5 + (i * 104729 % 9000) / 100.0,
       1 + i % 4,
       i % 11 <> 0
FROM generate_series(1, 1000) AS i
ON CONFLICT DO NOTHING;
"""


class BaseSandbox(Lifecycle):
    """What the sandboxes share: the lifecycle (``start()`` stops what it started if it fails; a context manager)
    and the keytab configuration (subclasses set ``principal``, ``keytab``, ``state_dir``, ``config_file``,
    ``servers``)."""

    principal: str
    keytab: Path
    state_dir: Path
    config_file: Path
    servers: dict[str, Any]

    def write_config(self, **overrides: Any) -> Path:
        """The kerb_jupyter configuration (keytab source for ``principal``); ``overrides`` replace keys."""
        config: dict[str, Any] = {
            "principal": self.principal,
            "source": {"type": "keytab", "keytab": str(self.keytab)},
            "state_dir": str(self.state_dir),
            "clusters": {name: self.cluster_config(name) for name in self.servers},
        }
        return write_json(self.config_file, {**config, **overrides})

    def cluster_config(self, name: str) -> dict[str, Any]:
        raise NotImplementedError


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` to ``path`` atomically (a reader sees the old file or the new one, never half of one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)
    return path


class Sandbox(BaseSandbox):
    """A realm with one user principal and one PostgreSQL server per cluster name."""

    def __init__(
        self,
        root: Path,
        clusters: Sequence[str] = ("analytics",),
        user: str = "alice",
        realm: str = "KERB.TEST",
        kdc_port: int = 0,
        pg_ports: Sequence[int] = (),
        max_life: int = 10 * 3600,
        max_renewable_life: int = 7 * 86400,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.realm = Realm(self.root / "realm", realm, kdc_port, max_life, max_renewable_life)
        self.user = user
        self.principal = self.realm.principal(user)
        self.keytab = self.root / f"{user}.keytab"
        self.password_file = self.root / f"{user}.password"
        self.config_file = self.root / "kerb_jupyter.json"
        self.state_dir = self.root / "state"
        ports = list(pg_ports) + [0] * (len(clusters) - len(pg_ports))
        self.servers = {name: Postgres(self.root, self.realm, name, port) for name, port in zip(clusters, ports)}

    def _start(self) -> None:
        self.realm.create()
        if not self.password_file.exists():
            password = secrets.token_urlsafe(18)
            self.password_file.touch(0o600)
            self.password_file.write_text(password)
            self.realm.add_principal("postgres/localhost")
            self.realm.add_principal(self.user, password=password, keytab=self.keytab)
        self.realm.start()
        for name, server in self.servers.items():
            server.start()
            server.create_database(name, self.principal)
            server.admin(f'SET ROLE "{self.principal}";' + DEMO_SQL, dbname=name)
        self.write_config()

    def cluster_config(self, name: str) -> dict[str, Any]:
        server = self.servers[name]
        return {"host": "localhost", "port": server.port, "dbname": name, "gssencmode": "prefer"}

    @property
    def env(self) -> dict[str, str]:
        """What a Jupyter server started by someone else needs to use this sandbox."""
        return {"KRB5_CONFIG": str(self.realm.krb5_conf), "KERB_JUPYTER_CONFIG": str(self.config_file)}

    def describe(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "clusters": [{"name": n, **self.cluster_config(n)} for n in self.servers],
            "principal": self.principal,
            "kdc": f"127.0.0.1:{self.realm.port}",
            "root": str(self.root),
        }

    def stop(self) -> None:
        for server in self.servers.values():
            server.destroy()
        self.realm.stop()
