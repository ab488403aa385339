"""The broker sandbox: an LDAP-backed realm, PostgreSQL clusters, moto STS, the broker, and a notebook config.

    with BrokerSandbox(tmpdir) as sb:
        sb.env   # KRB5_CONFIG, KERB_JUPYTER_CONFIG and the notebook's AWS credentials file

The user has no key at all (``addprinc -nokey``): only the broker's S4U can get tickets for her. Each cluster
has its own service principal (``postgres/localhost``, ``postgres/127.0.0.1``, ...), so a grant of one
cluster is not a grant of the others. The notebook's AWS credentials are a role session of an IAM Identity
Center-like role (``AWSReservedSSO_*``, session name = the user), made in moto with verification on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import SandboxError
from . import DEMO_SQL, BaseSandbox, write_json
from .ldap import LdapRealm
from .postgres import Postgres
from .procs import alive, free_port, start_daemon, stop_process
from .sts import ACCOUNT, REGION, SSO_ROLE, MotoSts

AUDIENCE = "kerb-jupyter-broker.sandbox"
HOSTS = ("localhost", "127.0.0.1", "127.0.0.2", "127.0.0.3")


class BrokerSandbox(BaseSandbox):
    def __init__(self, root: Path, clusters: Sequence[str] = ("analytics", "finance"), user: str = "alice",
                 realm: str = "KERB.TEST", max_life: int = 3600, broker_port: int = 0) -> None:
        if len(clusters) > len(HOSTS):
            raise SandboxError(f"the broker sandbox has at most {len(HOSTS)} clusters")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.realm = LdapRealm(self.root / "realm", realm, max_life=max_life, max_renewable_life=7 * 86400)
        self.user = user
        self.principal = self.realm.principal(user)
        self.hosts = dict(zip(clusters, HOSTS))
        self.servers = {name: Postgres(self.root, self.realm, name) for name in clusters}
        self.sts = MotoSts(self.root / "moto")
        self.broker_dir = self.root / "broker"
        self.broker_config = self.broker_dir / "broker.json"
        self.broker_keytab = self.broker_dir / "broker.keytab"
        self.audit_log = self.broker_dir / "audit.jsonl"
        self.broker_port = broker_port
        self.broker_proc: subprocess.Popen[bytes] | None = None
        self.aws_dir = self.root / "aws"
        self.config_file = self.root / "kerb_jupyter.json"
        self.state_dir = self.root / "state"

    def spn(self, cluster: str) -> str:
        return self.realm.principal(f"postgres/{self.hosts[cluster]}")

    @property
    def broker_url(self) -> str:
        return f"http://127.0.0.1:{self.broker_port}"

    # -- start / stop -------------------------------------------------------------------------------------
    def _start(self) -> None:
        self.realm.create()
        for name in self.servers:
            self.realm.add_principal(f"postgres/{self.hosts[name]}")
        self.realm.add_user(self.user, groups=["analysts"])  # no key: nothing of hers to steal
        self.broker_dir.mkdir(mode=0o700, exist_ok=True)
        self.realm.add_delegating_service("broker/localhost", [self.spn(n) for n in self.servers],
                                          keytab=self.broker_keytab)
        self.realm.start()
        for name, server in self.servers.items():
            server.start()
            if self.hosts[name] != "localhost":  # Postgres exports postgres/localhost; add this cluster's own
                self.realm.kadmin(f"ktadd -k {server.keytab} -norandkey {self.spn(name)}")
            server.create_database(name, self.principal)
            server.admin(f'SET ROLE "{self.principal}";' + DEMO_SQL, dbname=name)
        self.sts.start()
        self.write_aws_credentials(self.sts.session(SSO_ROLE, self.user))
        self.broker_port = self.broker_port or free_port()
        self.write_broker_config()
        self.start_broker()
        self.write_config()

    def write_aws_credentials(self, creds: dict[str, str]) -> None:
        """The notebook's own AWS credentials (a role session), as an AWS shared credentials file."""
        self.aws_dir.mkdir(mode=0o700, exist_ok=True)
        path = self.aws_dir / "credentials"
        path.touch(0o600)
        path.write_text("[default]\n" + "".join(f"{k} = {v}\n" for k, v in creds.items()))
        (self.aws_dir / "config").write_text(f"[default]\nregion = {REGION}\n")

    def write_broker_config(self, **overrides: Any) -> Path:
        reader = self.broker_dir / "ldap.password"
        reader.touch(0o600)
        reader.write_text(self.realm.slapd.reader_password)
        group = self.realm.group_dn("analysts")
        doc: dict[str, Any] = {
            "listen": {"address": "127.0.0.1", "port": self.broker_port},
            "audience": AUDIENCE,
            "sts": {"endpoint": self.sts.url + "/", "region": REGION, "timeout": 5},
            "kerberos": {"principal": self.realm.principal("broker/localhost"), "keytab": str(self.broker_keytab),
                         "max_lifetime": 3600},
            "clusters": {name: self.spn(name) for name in self.servers},
            "ldap": {"url": self.realm.slapd.ldaps_url, "ca_bundle": str(self.realm.slapd.ca_cert),
                     "base": self.realm.people, "bind_dn": self.realm.slapd.reader_dn,
                     "password_file": str(reader), "cache_seconds": 60},
            "audit_log": str(self.audit_log),
            "policy": {"rules": [{
                "name": "data-scientists", "account": ACCOUNT, "role": "AWSReservedSSO_DataScientists_*",
                "identity_from": "session", "mapping": {"rules": [{"template": "{name}@" + self.realm.realm}]},
                "groups": {group: list(self.servers)}, "source_cidrs": ["127.0.0.0/8"],
            }]},
        }
        return write_json(self.broker_config, {**doc, **overrides})

    def start_broker(self) -> None:
        if alive(self.broker_proc):
            return
        env = {**os.environ, "KRB5_CONFIG": str(self.realm.krb5_conf)}
        env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "KRB5CCNAME", "KERB_JUPYTER"))}
        cmd = [sys.executable, "-c", "import sys; from kerb_jupyter.cli import main; sys.exit(main())",
               "broker", "--config", str(self.broker_config)]
        self.broker_proc = start_daemon("the broker", cmd, self.broker_port, self.broker_dir / "broker.log",
                                        timeout=30, env=env)

    def stop_broker(self) -> None:
        proc, self.broker_proc = self.broker_proc, None
        stop_process(proc)

    def reload_broker(self) -> None:
        """SIGHUP: the broker re-reads its policy (keeping the old one if the new one is bad)."""
        if self.broker_proc is not None:
            self.broker_proc.send_signal(signal.SIGHUP)

    def write_config(self, **overrides: Any) -> Path:
        """The notebook's kerb_jupyter configuration: source ``broker``, no principal (the broker says who)."""
        config: dict[str, Any] = {
            "source": {"type": "broker", "url": self.broker_url, "audience": AUDIENCE, "region": REGION,
                       "sts_url": self.sts.url + "/"},
            "state_dir": str(self.state_dir),
            "clusters": {name: self.cluster_config(name) for name in self.servers},
        }
        return write_json(self.config_file, {**config, **overrides})

    def cluster_config(self, name: str) -> dict[str, Any]:
        return {"host": self.hosts[name], "port": self.servers[name].port, "dbname": name, "gssencmode": "prefer"}

    @property
    def env(self) -> dict[str, str]:
        """What the notebook's Jupyter server needs: Kerberos config, kerb_jupyter config, its AWS credentials."""
        return {"KRB5_CONFIG": str(self.realm.krb5_conf), "KERB_JUPYTER_CONFIG": str(self.config_file),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.aws_dir / "credentials"),
                "AWS_CONFIG_FILE": str(self.aws_dir / "config"), "AWS_DEFAULT_REGION": REGION}

    def describe(self) -> dict[str, Any]:
        return {"env": self.env, "broker": self.broker_url, "sts": self.sts.url, "principal": self.principal,
                "clusters": [{"name": n, "spn": self.spn(n), **self.cluster_config(n)} for n in self.servers],
                "audit_log": str(self.audit_log), "root": str(self.root)}

    def stop(self) -> None:
        self.stop_broker()
        self.sts.stop()
        for server in self.servers.values():
            server.destroy()
        self.realm.stop()
