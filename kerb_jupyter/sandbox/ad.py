"""The AD sandbox: a Samba AD DC plus PostgreSQL clusters whose service keytabs come from AD, and a notebook config.

    with ADSandbox(tmpdir) as sb:
        sb.ad                  # the SambaAD (names, keytabs, passwords, samba_tool, PLAN)
        sb.env                 # KRB5_CONFIG and KERB_JUPYTER_CONFIG for a Jupyter server (keytab source, alice)

Each cluster listens on its own loopback address (``sb.ad.cluster_address(name)``), its service principal is
``postgres/<that address>@AD.KERB.TEST`` on the AD account ``pg-<name>``, and its keytab is the one ``samba-tool
domain exportkeytab`` wrote (RC4 only). Every user of the plan has a login role ``"<name>@AD.KERB.TEST"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import DEMO_SQL, BaseSandbox
from .adplan import PLAN, DirectoryPlan
from .postgres import Postgres
from .samba import SambaAD

__all__ = ["ADSandbox"]


class ADSandbox(BaseSandbox):
    """Samba AD DC + one PostgreSQL server per cluster (default: all of the plan's) + alice's keytab config."""

    def __init__(self, root: Path, clusters: Sequence[str] | None = None, user: str = "alice",
                 realm: str = "AD.KERB.TEST", plan: DirectoryPlan = PLAN) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.realm = self.ad = SambaAD(self.root / "ad", realm, plan=plan)
        self.user = user
        self.principal = self.ad.principal(user)
        self.keytab = self.ad.keytab(user)
        self.config_file = self.root / "kerb_jupyter.json"
        self.state_dir = self.root / "state"
        names = list(clusters) if clusters is not None else list(plan.clusters)
        self.servers = {name: Postgres(self.root, self.ad, name, address=self.ad.cluster_address(name),
                                       spn=self.ad.spn(name)) for name in names}

    def _start(self) -> None:
        self.ad.start()
        roles = [self.ad.principal(u.name) for u in self.ad.plan.users]
        for name, server in self.servers.items():
            server.start()
            server.create_database(name, self.principal)
            server.admin(f'SET ROLE "{self.principal}";' + DEMO_SQL, dbname=name)
            for role in roles:
                if role != self.principal and not server.admin(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'"):
                    server.admin(f'CREATE ROLE "{role}" WITH LOGIN')
            server.admin("GRANT SELECT ON trips TO PUBLIC", dbname=name)
        self.write_config()

    def cluster_config(self, name: str) -> dict[str, Any]:
        server = self.servers[name]
        return {"host": server.address, "port": server.port, "dbname": name, "gssencmode": "prefer"}

    @property
    def env(self) -> dict[str, str]:
        return {"KRB5_CONFIG": str(self.ad.krb5_conf), "KERB_JUPYTER_CONFIG": str(self.config_file)}

    def describe(self) -> dict[str, Any]:
        ad = self.ad
        return {
            "env": self.env,
            "principal": self.principal,
            "clusters": [{"name": n, "spn": ad.spn(n), "delegated": n in ad.plan.delegated, **self.cluster_config(n)}
                         for n in self.servers],
            "ad": {"realm": ad.realm, "domain": ad.domain, "base_dn": ad.base_dn, "dc_host": ad.dc_host,
                   "address": ad.address, "kdc": ad.kdc, "ldaps_url": ad.ldaps_url, "ca_cert": str(ad.ca_cert),
                   "users": [u.name for u in ad.plan.users], "broker": ad.plan.broker,
                   "broker_keytab": str(ad.keytab(ad.plan.broker)), "ldap_reader": ad.plan.ldap_reader},
            "kdc": ad.kdc,
            "root": str(self.root),
        }

    def stop(self) -> None:
        for server in self.servers.values():
            server.destroy()
        self.ad.stop()
