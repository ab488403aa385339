"""A throwaway MIT Kerberos realm on 127.0.0.1: database, principals, keytabs and a foreground krb5kdc."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ..core.errors import SandboxError
from .procs import Daemon, alive, claim_port, find_binary, port_is_free, start_daemon, tail, wait_port_free

KDC_PACKAGES = "krb5-kdc krb5-admin-server krb5-user"
MASTER_PASSWORD = "sandbox-master-not-secret"  # noqa: S105 - a throwaway local realm


class Realm(Daemon):
    """One KDC realm whose whole state lives in ``root``.

    ``max_life`` and ``max_renewable_life`` are KDC-wide caps in seconds; tests use short ones so that
    expiry and renewal happen in seconds.
    """

    stop_timeout = 5

    def __init__(
        self,
        root: Path,
        realm: str = "KERB.TEST",
        port: int = 0,
        max_life: int = 10 * 3600,
        max_renewable_life: int = 7 * 86400,
    ) -> None:
        self.root = Path(root).resolve()
        self.realm = realm
        self.port = port
        self.max_life = max_life
        self.max_renewable_life = max_renewable_life
        self.krb5_conf = self.root / "krb5.conf"
        self.kdc_conf = self.root / "kdc.conf"
        self.log_file = self.root / "krb5kdc.log"

    # -- set-up ---------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment a Kerberos client or the KDC needs to use this realm."""
        return {"KRB5_CONFIG": str(self.krb5_conf), "KRB5_KDC_PROFILE": str(self.kdc_conf)}

    def create(self) -> None:
        """Write the configuration and create the KDC database (idempotent for the same root)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = claim_port(self.port, "the KDC")
        self._write_configs()
        if not (self.root / "principal").exists():
            self._run(
                find_binary("kdb5_util", KDC_PACKAGES),
                "-r", self.realm, "create", "-s", "-W", "-P", MASTER_PASSWORD,
            )

    def _write_configs(self) -> None:
        r, p = self.realm, self.port
        self.krb5_conf.write_text(
            f"""[libdefaults]
    default_realm = {r}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    forwardable = true
    renew_lifetime = 7d
    ticket_lifetime = 10h

[realms]
    {r} = {{
        kdc = 127.0.0.1:{p}
    }}

[domain_realm]
    localhost = {r}
    .localhost = {r}
"""
        )
        self.kdc_conf.write_text(
            f"""[kdcdefaults]
    kdc_listen = 127.0.0.1:{p}
    kdc_tcp_listen = 127.0.0.1:{p}

[realms]
    {r} = {{
        {self._database()}
        key_stash_file = {self.root}/stash
        acl_file = {self.root}/kadm5.acl
        max_life = {self.max_life}s
        max_renewable_life = {self.max_renewable_life}s
        kadmind_listen = 127.0.0.1:0
        kpasswd_listen = 127.0.0.1:0
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}
{self._db_modules()}
[logging]
    kdc = FILE:{self.log_file}
"""
        )
        (self.root / "kadm5.acl").write_text("")

    def _database(self) -> str:
        """The kdc.conf line that says where the principals are."""
        return f"database_name = {self.root}/principal"

    def _db_modules(self) -> str:
        """Extra kdc.conf sections before ``[logging]`` (a database module's ``[dbmodules]``), after a blank line."""
        return ""

    def _run(self, *args: str) -> str:
        env = {**os.environ, **self.env}
        res = subprocess.run(args, env=env, capture_output=True, text=True, cwd=self.root, check=False)
        out = res.stdout + res.stderr
        if res.returncode != 0:
            raise SandboxError(f"{Path(args[0]).name} failed (exit {res.returncode}): {tail(out)}")
        return out

    def kadmin(self, query: str) -> str:
        """Run one kadmin.local query; raise if its output reports a failure (it always exits 0)."""
        out = self._run(find_binary("kadmin.local", KDC_PACKAGES), "-r", self.realm, "-q", query)
        lowered = out.lower()
        # kadmin.local reports failures as "<cmd>: <message> while <doing>" and still exits 0.
        if " while " in lowered or any(w in lowered for w in ("error", "failed", "not found", "unable")):
            raise SandboxError(f"kadmin.local {query.split()[0]} failed: {tail(out)}")
        return out

    def principal(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.realm}"

    def add_principal(
        self,
        name: str,
        password: str | None = None,
        keytab: Path | None = None,
        max_life: int | None = None,
        max_renewable_life: int | None = None,
    ) -> str:
        """Create a renewable principal with a password or a random key; optionally export a keytab.

        The keytab is exported with ``-norandkey`` so the password stays valid.
        """
        princ = self.principal(name)
        life = max_life or self.max_life
        renew = max_renewable_life or self.max_renewable_life
        key = f"-pw {password}" if password else "-randkey"
        self.kadmin(f"addprinc {key} -maxlife {life}s -maxrenewlife {renew}s +renewable {princ}")
        if keytab is not None:
            self.export_keytab(princ, keytab)
        return princ

    def export_keytab(self, princ: str, keytab: Path) -> Path:
        keytab = Path(keytab).resolve()
        keytab.unlink(missing_ok=True)
        self.kadmin(f"ktadd -k {keytab} -norandkey {princ}")
        keytab.chmod(0o600)
        return keytab

    def modify_principal(self, princ: str, *flags: str) -> None:
        """e.g. ``modify_principal("alice", "-allow_tix")`` disables a principal."""
        self.kadmin(f"modprinc {' '.join(flags)} {self.principal(princ)}")

    # -- the daemon ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if alive(self.proc):
            return
        if not port_is_free(self.port):
            raise SandboxError(f"port 127.0.0.1:{self.port} for the KDC is already in use")
        self.proc = start_daemon("the KDC", [find_binary("krb5kdc", KDC_PACKAGES), "-n", "-r", self.realm],
                                 self.port, self.root / "krb5kdc.stderr", env={**os.environ, **self.env},
                                 cwd=self.root, own_logs=[self.log_file])

    def stop(self) -> None:
        if alive(self.proc):
            super().stop()
            # krb5kdc has released the port once it exits; wait so a restart can bind again.
            wait_port_free(self.port, 5)
        self.proc = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
