"""A throwaway PostgreSQL server on 127.0.0.1 that authenticates clients with GSSAPI (Kerberos).

Run as root, PostgreSQL refuses to start; the server then runs as the unprivileged ``postgres`` OS user
in a private directory of its own under the system temp dir (pytest's 0700 directories are not
traversable by another user).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ..core.errors import SandboxError
from .procs import claim_port, find_binary, tail

PG_PACKAGES = "postgresql"
ADMIN_USER = "postgres"


class Postgres:
    """One PostgreSQL server; ``realm`` supplies krb5.conf and the service keytab (``spn``'s key).

    ``address``: the loopback address it listens on (each cluster of the AD sandbox has its own, so that its
    service principal ``postgres/<address>`` is its own).
    """

    def __init__(self, root: Path, realm: Any, name: str = "pg", port: int = 0, *, address: str = "127.0.0.1",
                 spn: str = "postgres/localhost") -> None:
        self.realm = realm
        self.name = name
        self.port = port
        self.address = address
        self.spn = spn
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._run_as = _unprivileged_user()
            self.base = Path(tempfile.mkdtemp(prefix=f"kerb-jupyter-{name}-"))
            os.chown(self.base, self._run_as.pw_uid, self._run_as.pw_gid)
            (Path(root) / f"{name}.location").write_text(str(self.base))
        else:
            self.base = Path(root).resolve() / name
            self.base.mkdir(parents=True, exist_ok=True)
        self.data = self.base / "data"
        self.sockdir = self.base / "sock"
        self.log_file = self.base / "postgres.log"
        self.keytab = self.base / "postgres.keytab"
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        self.port = claim_port(self.port, f"PostgreSQL {self.name!r}")
        shutil.copy(self.realm.krb5_conf, self.base / "krb5.conf")
        self.realm.export_keytab(self.realm.principal(self.spn), self.keytab)
        self.sockdir.mkdir(exist_ok=True)
        (self.base / "rcache").mkdir(exist_ok=True)
        self._chown_tree()
        if not (self.data / "PG_VERSION").exists():
            self._run(find_binary("initdb", PG_PACKAGES), "-D", str(self.data), "-U", ADMIN_USER,
                      "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C")
            self._configure()
        self._run(find_binary("pg_ctl", PG_PACKAGES), "start", "-w", "-t", "30", "-D", str(self.data),
                  "-l", str(self.log_file), what="PostgreSQL did not start")
        self.started = True

    def _configure(self) -> None:
        r = self.realm.realm
        # Loopback clients of a server on another 127.x address connect from 127.0.0.1 (or that address).
        nets = ["127.0.0.1/32"] + ([f"{self.address}/32"] if self.address != "127.0.0.1" else [])
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"""
# kerb_jupyter sandbox
listen_addresses = '{self.address}'
port = {self.port}
unix_socket_directories = '{self.sockdir}'
krb_server_keyfile = 'FILE:{self.keytab}'
log_connections = on
log_statement = 'all'
log_line_prefix = '%m [%p] app=%a user=%u db=%d '
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
"""
            )
        (self.data / "pg_hba.conf").write_text(
            f"""# kerb_jupyter sandbox: superuser over the private socket, everyone else by Kerberos only
local all {ADMIN_USER} trust
""" + "".join(f"hostgssenc all all {net} gss include_realm=1 krb_realm={r}\n"
                         f"host all all {net} gss include_realm=1 krb_realm={r}\n" for net in nets)
        )
        self._chown_tree()

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        try:
            self._run(find_binary("pg_ctl", PG_PACKAGES), "stop", "-w", "-t", "30", "-m", "fast",
                      "-D", str(self.data), what="PostgreSQL did not stop")
        except SandboxError:
            self._run(find_binary("pg_ctl", PG_PACKAGES), "stop", "-m", "immediate",
                      "-D", str(self.data), what="PostgreSQL did not stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # -- administration -----------------------------------------------------------------------------
    def admin(self, sql: str, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run SQL as the superuser over the private Unix socket; returns the rows of the last statement."""
        import psycopg

        with psycopg.connect(host=str(self.sockdir), port=self.port, user=ADMIN_USER, dbname=dbname,
                             autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def create_database(self, dbname: str, owner_principal: str) -> None:
        """An Aurora-style login role ``"user@REALM"`` owning database ``dbname`` (idempotent)."""
        role = owner_principal.replace('"', '""')
        literal = owner_principal.replace("'", "''")
        if not self.admin(f"SELECT 1 FROM pg_roles WHERE rolname = '{literal}'"):
            self.admin(f'CREATE ROLE "{role}" WITH LOGIN')
        if not self.admin(f"SELECT 1 FROM pg_database WHERE datname = '{dbname}'"):
            self.admin(f'CREATE DATABASE "{dbname}" OWNER "{role}"')

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    # -- helpers --------------------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "KRB5"))}
        env.update(KRB5_CONFIG=str(self.base / "krb5.conf"), KRB5RCACHEDIR=str(self.base / "rcache"),
                   LC_ALL="C")
        return env

    def _run(self, *args: str, what: str = "") -> None:
        kwargs: dict[str, Any] = {}
        if self._run_as is not None:
            kwargs = {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}
        res = subprocess.run(args, env=self._env(), cwd=self.base, capture_output=True, text=True,
                             check=False, **kwargs)
        if res.returncode != 0:
            detail = tail(res.stdout + res.stderr + "\n" + self.log_text())
            raise SandboxError(f"{what or Path(args[0]).name + ' failed'} (exit {res.returncode}): {detail}")

    def _chown_tree(self) -> None:
        if self._run_as is None:
            return
        uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
        for dirpath, _dirs, files in os.walk(self.base):
            os.chown(dirpath, uid, gid)
            for f in files:
                os.chown(os.path.join(dirpath, f), uid, gid)


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise SandboxError("running as root, but there is no 'postgres' OS user to run PostgreSQL as: "
                       "install the Debian package postgresql")
