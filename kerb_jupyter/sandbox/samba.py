"""A throwaway Active Directory domain (Samba 4.17 AD DC) on a private loopback address, for the demo and tests.

    with SambaAD(tmpdir) as ad:   # provision + start + PLAN's accounts: 15 s idle, up to ~100 s on a busy machine
        ...

The API (everything else is private):

- names: ``realm`` (AD.KERB.TEST), ``domain`` (ADKERB), ``dns_domain``, ``base_dn``, ``dc_host`` (dc1.<dns domain>,
  in the certificate, not resolvable), ``address`` (127.X.Y.1), ``kdc`` (address:88), ``ldap_url``, ``ldaps_url``,
  ``ca_cert`` (``dc/private/tls/ca.pem``), ``krb5_conf`` (client configuration), ``env`` ({"KRB5_CONFIG": ...}),
  ``plan`` (``PLAN`` by default);
- per account: ``principal(name)``, ``upn(name)``, ``user_dn(name)``, ``group_dn(name)``, ``keytab(name)`` and
  ``password(name)`` / ``password_file(name)`` (every planned user, the broker, ``kjldap``'s password; a cluster's
  service keytab is ``keytab(spn(cluster))``), ``cluster_address(cluster)`` (127.X.Y.2, .3, ...), ``spn(cluster)``;
- actions: ``start()`` / ``stop()`` / ``destroy()`` (also a context manager), ``samba_tool(*args)`` (raises
  SandboxError with its output), ``add_user(name, password=None, *, upn=None)``, ``add_group(name)``,
  ``add_members(group, *members)``, ``add_spn(account, spn)``, ``export_keytab(principal, path)``,
  ``set_disabled(name, disabled=True)``, ``run(argv)`` (a command with this DC's KRB5_CONFIG; no namespace is
  involved, any process on the machine can reach the DC).

Design (measured on Debian 12, Samba 4.17.12):

- **No DNS, no network namespace.** Provisioned with ``--dns-backend=NONE`` and run with ``server services = ldap,
  kdc`` (no DNS on port 53, no SMB, RPC, NetBIOS or winbind), ``interfaces = 127.X.Y.1/8`` and ``bind interfaces
  only = yes``: the KDC (88, TCP+UDP), kpasswd (464) and LDAP (389, 636, 3268, 3269) listen on that address only, in
  the machine's own network namespace, so tests, PostgreSQL and the broker reach it directly. Every 127.0.0.0/8
  address routes to ``lo`` on Linux; X.Y is random and checked free, so two sandboxes at once do not collide.
  Clients use our ``krb5.conf`` (``kdc = 127.X.Y.1``, no DNS lookups). The machine's ``/etc/samba/smb.conf``,
  ``/etc/krb5.conf`` and ``/etc/hosts`` are never read or written: provision runs with an empty config file and
  ``--targetdir`` inside ``root``, and the DC runs from our own ``root/smb.conf``.
- **TLS with a subjectAltName.** Samba's self-generated certificate names the DC in its CN only, which Python's
  ``ssl`` does not accept as a host name. We generate a CA and a server certificate (SAN: the DC's DNS name and
  its IP address) into ``private/tls/`` before the first start, so ``ldaps://127.X.Y.1`` verifies with
  ``ca_cert`` and the standard host-name check.
- **Lifetimes.** Samba 4.17 takes whole hours only (``kdc:user ticket lifetime = 10``, ``kdc:renewal lifetime =
  168``: AWS Managed AD's defaults). It refuses to renew tickets of ~90 s or less; ask for >= 150 s from the client.
- **One process tree, always stopped.** ``samba -i`` runs in its own session with stdin a pipe we hold: it exits on
  EOF, so even a killed test run takes the DC with it; ``stop()`` closes the pipe, then signals the group.
- **Accounts from one plan.** ``PLAN`` (``adplan.py``, whose docstring has the table) lists every user, group,
  service account and cluster; ``populate()`` creates them in one ``samba-tool`` process (passwords travel on its
  stdin, never on a command line). Other code reads names from ``PLAN`` rather than hard-coding them. Service
  keytabs come from ``samba-tool domain exportkeytab`` and hold RC4 keys only (as exported by Samba; the tickets'
  session keys are still AES); user keytabs hold AES256, AES128 and RC4.

Passwords and keytabs live in ``root/secrets`` (0700 directory, 0600 files).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..core.errors import SandboxError
from .adplan import PLAN, DirectoryPlan, UserPlan
from .procs import Lifecycle, alive, find_binary, group_alive, port_is_free, read_log, signal_group, tail, wait_for_port
from .sambafiles import BATCH, krb5_conf, scrub, smb_conf, write_tls

__all__ = ["PLAN", "DirectoryPlan", "SambaAD", "UserPlan"]

SAMBA_PACKAGES = "samba samba-ad-dc samba-ad-provision winbind smbclient ldb-tools"
SAMBA_TOOL_PYTHON = "/usr/bin/python3"  # samba-tool's own interpreter (the python3-samba bindings live there)
DC_PORTS = (88, 389, 464, 636)


class SambaAD(Lifecycle):
    """One Samba AD DC whose whole state lives in ``root``; see the module docstring."""

    def __init__(self, root: Path, realm: str = "AD.KERB.TEST", domain: str = "ADKERB", *,
                 address: str | None = None, host_name: str = "dc1", plan: DirectoryPlan = PLAN) -> None:
        self.root = Path(root).resolve()
        self.realm = realm.upper()
        self.domain = domain.upper()
        self.dns_domain = self.realm.lower()
        self.base_dn = ",".join(f"DC={part}" for part in self.dns_domain.split("."))
        self.dc_host = f"{host_name}.{self.dns_domain}"
        self.host_name = host_name
        self.plan = plan
        self.address = address or self._recorded_address() or _free_block()
        self.provision_dir = self.root / "dc"
        self.private = self.provision_dir / "private"
        self.smb_conf = self.root / "smb.conf"
        self.krb5_conf = self.root / "krb5.conf"
        self.ca_cert = self.private / "tls" / "ca.pem"
        self.log_file = self.root / "samba.log"
        self.secrets = self.root / "secrets"
        self.proc: subprocess.Popen[bytes] | None = None
        self.timings: dict[str, float] = {}

    # -- names ----------------------------------------------------------------------------------------------
    @property
    def kdc(self) -> str:
        return f"{self.address}:88"

    @property
    def ldap_url(self) -> str:
        return f"ldap://{self.address}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.address}"

    @property
    def env(self) -> dict[str, str]:
        return {"KRB5_CONFIG": str(self.krb5_conf)}

    def principal(self, name: str) -> str:
        return name if "@" in name else f"{name}@{self.realm}"

    def cluster_address(self, cluster: str) -> str:
        """The loopback address a cluster's PostgreSQL listens on (127.X.Y.2, .3, ...; the DC is .1)."""
        index = self.plan.clusters.index(cluster) if cluster in self.plan.clusters else None
        if index is None:
            raise SandboxError(f"{cluster!r} is not a cluster of this directory plan ({', '.join(self.plan.clusters)})")
        return self._address_in_block(2 + index)

    def spn(self, cluster: str) -> str:
        """The cluster's service principal, ``postgres/<its address>@REALM`` (libpq asks for the host as typed)."""
        return self.principal(f"postgres/{self.cluster_address(cluster)}")

    def user_dn(self, name: str) -> str:
        return f"CN={name},CN=Users,{self.base_dn}"

    def group_dn(self, name: str) -> str:
        return f"CN={name},CN=Users,{self.base_dn}"

    def upn(self, name: str) -> str:
        user = self.plan.user_index.get(name)
        return (user.upn if user is not None and user.upn else None) or f"{name}@{self.dns_domain}"

    def keytab(self, name: str) -> Path:
        """Where ``populate()`` put ``name``'s keytab (every planned user, the broker, each cluster's service)."""
        return self.secrets / f"{name.replace('/', '_')}.keytab"

    def password_file(self, name: str) -> Path:
        return self.secrets / f"{name}.password"

    def password(self, name: str) -> str:
        return self.password_file(name).read_text()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Provision (first time), start the DC, create the plan's accounts (first time); ``start()`` stops all
        on failure."""
        if alive(self.proc):
            return
        if os.geteuid() != 0:
            raise SandboxError("the Samba AD DC runs as root (it binds ports 88, 389, 464 and 636): run the AD "
                               "sandbox and its tests as root")
        if not all(port_is_free(port, self.address) for port in DC_PORTS):  # before ~30 s of provisioning
            raise SandboxError(f"{self.address} already has a listener on one of the DC's ports {DC_PORTS}: "
                               "is another sandbox using this address? Choose another (address=...)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        (self.root / "address").write_text(self.address)
        began = time.monotonic()
        if not (self.private / "sam.ldb").exists():
            self.provision()
            self.timings["provision"] = time.monotonic() - began
        self._write_tls()
        self._write_configs()
        began = time.monotonic()
        self._run_samba()
        self.timings["start"] = time.monotonic() - began
        if not (self.root / "populated").exists():
            began = time.monotonic()
            self.populate()
            (self.root / "populated").write_text("")
            self.timings["populate"] = time.monotonic() - began

    def provision(self) -> None:
        """``samba-tool domain provision`` into ``root/dc`` (no DNS), reading no system configuration."""
        empty = self.root / "provision.conf"
        empty.write_text("")
        self.provision_dir.mkdir(exist_ok=True)
        admin = _new_password()
        self._tool_batch([["domain", "provision", f"--targetdir={self.provision_dir}", f"--realm={self.realm}",
                           f"--domain={self.domain}", "--server-role=dc", "--dns-backend=NONE",
                           f"--host-name={self.host_name}", "--adminpass", admin]], config=empty)

    def _run_samba(self) -> None:
        samba = find_binary("samba", SAMBA_PACKAGES)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen([samba, "-i", "-s", str(self.smb_conf), "--debug-stdout"],
                                         stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.root, start_new_session=True, env=self._tool_env())
        deadline = time.monotonic() + 60
        for port in (88, 636):
            if not wait_for_port(port, self.proc, max(deadline - time.monotonic(), 0), host=self.address):
                raise SandboxError(f"Samba AD DC did not start on {self.address}:{port} "
                                   f"(log {self.log_file}): {tail(read_log(self.log_file))}")

    def stop(self) -> None:
        """Stop the DC's whole process tree (EOF on its stdin, then SIGTERM, then SIGKILL to its group)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Workers can outlive the parent by a moment; none may outlive stop().
        deadline = time.monotonic() + 5
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if group_alive(proc.pid):
            signal_group(proc.pid, signal.SIGKILL)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return alive(self.proc)

    # -- administration -------------------------------------------------------------------------------------
    def samba_tool(self, *args: str) -> str:
        """Run one ``samba-tool`` command against this DC's own configuration; its output, or a SandboxError."""
        return self._tool_batch([list(args)])

    def add_user(self, name: str, password: str | None = None, *, upn: str | None = None) -> str:
        """Create a user (a random password unless given; kept in ``password_file(name)``); its principal."""
        password = password or _new_password()
        self._tool_batch(self._user_commands(name, password, upn))
        self._save_password(name, password)  # only once the account exists (a refused create keeps the old file)
        return self.principal(name)

    def add_group(self, name: str) -> None:
        self.samba_tool("group", "add", name)

    def add_members(self, group: str, *members: str) -> None:
        """Users or groups (groups nest) join ``group``."""
        self.samba_tool("group", "addmembers", group, ",".join(members))

    def add_spn(self, account: str, spn: str) -> None:
        self.samba_tool("spn", "add", spn.split("@")[0], account)

    def export_keytab(self, principal: str, path: Path) -> Path:
        """``samba-tool domain exportkeytab`` for one principal (a user or an SPN) into a new 0600 ``path``."""
        path = Path(path).resolve()
        path.unlink(missing_ok=True)
        self.samba_tool("domain", "exportkeytab", str(path), f"--principal={principal.split('@')[0]}")
        path.chmod(0o600)
        return path

    def set_disabled(self, name: str, disabled: bool = True) -> None:
        self.samba_tool("user", "disable" if disabled else "enable", name)

    def run(self, argv: Sequence[str], *, input: str | None = None, timeout: float = 60,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command that talks to the DC, with this DC's KRB5_CONFIG (no namespace: any process can reach
        the DC; this is plain ``subprocess.run``, output captured as text, never raising on a non-zero exit)."""
        full = {**os.environ, **self.env, **(env or {})}
        return subprocess.run(list(argv), env=full, input=input, capture_output=True, text=True, check=False,
                              timeout=timeout)

    def populate(self) -> None:
        """Create every account, group, SPN, delegation and keytab of ``self.plan`` (one samba-tool process)."""
        plan = self.plan
        passwords = {name: _new_password() for name in [*(u.name for u in plan.users), plan.broker, plan.ldap_reader,
                                                         *map(plan.service_account, plan.clusters)]}
        cmds: list[list[str]] = [["group", "add", g] for g in plan.groups]
        for user in plan.users:
            cmds += self._user_commands(user.name, passwords[user.name], user.upn)
        for name in (plan.broker, plan.ldap_reader):
            cmds += self._user_commands(name, passwords[name], None)
        for group, members in plan.groups.items():
            users = [u.name for u in plan.users if group in u.groups]
            if members or users:
                cmds.append(["group", "addmembers", group, ",".join([*members, *users])])
        for user in plan.users:
            if user.sensitive:
                cmds.append(["user", "sensitive", user.name, "on"])
        for cluster in plan.clusters:
            account, spn = plan.service_account(cluster), self.spn(cluster).split("@")[0]
            cmds += self._user_commands(account, passwords[account], None)
            cmds.append(["spn", "add", spn, account])
            cmds.append(["domain", "exportkeytab", str(self.keytab(spn)), f"--principal={spn}"])
        cmds.append(["spn", "add", f"HTTP/{plan.broker}.{self.dns_domain}", plan.broker])
        cmds.append(["delegation", "for-any-protocol", plan.broker, "on"])
        cmds += [["delegation", "add-service", plan.broker, self.spn(c).split("@")[0]] for c in plan.delegated]
        for name in [*(u.name for u in plan.users), plan.broker]:
            cmds.append(["domain", "exportkeytab", str(self.keytab(name)), f"--principal={name}"])
        cmds += [["user", "disable", u.name] for u in plan.users if u.disabled]  # after its keytab was exported
        self._tool_batch(cmds)
        for name, password in passwords.items():
            self._save_password(name, password)
        for path in self.secrets.iterdir():
            path.chmod(0o600)

    def _save_password(self, name: str, password: str) -> None:
        pw_file = self.password_file(name)
        pw_file.unlink(missing_ok=True)
        pw_file.touch(0o600)
        pw_file.write_text(password)

    def _user_commands(self, name: str, password: str, upn: str | None) -> list[list[str]]:
        create = ["user", "create", name, password]
        if name in self.plan.user_index:
            create.append(f"--mail-address={self.plan.email(name)}")
        cmds = [create, ["user", "setexpiry", name, "--noexpiry"]]
        if upn:
            cmds.append(["@ldbmodify", f"dn: {self.user_dn(name)}\nchangetype: modify\nreplace: userPrincipalName\n"
                                       f"userPrincipalName: {upn}\n"])
        return cmds

    def _tool_batch(self, commands: list[list[str]], config: Path | None = None) -> str:
        """Run samba-tool commands in one Python process (~0.1 s each instead of ~0.7 s). Commands travel on
        stdin (passwords never appear on a command line); ``["@ldbmodify", LDIF]`` applies LDIF to sam.ldb.
        Raises SandboxError naming the failed command (subcommand only) and its output."""
        conf = str(config or self.smb_conf)
        doc = json.dumps({"config": conf, "sam": str(self.private / "sam.ldb"), "commands": commands})
        res = subprocess.run([SAMBA_TOOL_PYTHON, "-c", BATCH], input=doc, capture_output=True, text=True,
                             env=self._tool_env(), cwd=self.root, check=False, timeout=600)
        out = res.stdout + res.stderr
        if res.returncode != 0:
            failed = next((line for line in out.splitlines() if line.startswith("@@FAILED")), "@@FAILED ?")
            raise SandboxError(f"samba-tool {failed.removeprefix('@@FAILED ')} failed: "
                               f"{tail(scrub(out, commands))}")
        return "\n".join(line for line in out.splitlines() if not line.startswith("@@"))

    def _tool_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KRB5", "PYTHON", "VIRTUAL_ENV"))}
        env["KRB5_CONFIG"] = str(self.krb5_conf)
        env["TDB_NO_FSYNC"] = "1"  # a throwaway database: no fsync per transaction (as Samba's own selftest)
        return env

    # -- configuration --------------------------------------------------------------------------------------
    def _recorded_address(self) -> str | None:
        try:
            return (self.root / "address").read_text().strip() or None
        except OSError:
            return None

    def _address_in_block(self, last: int) -> str:
        return ".".join([*self.address.split(".")[:3], str(last)])

    def _write_configs(self) -> None:
        (self.provision_dir / "run").mkdir(exist_ok=True)  # never /run/samba: another DC may be using it
        self.smb_conf.write_text(smb_conf(self))
        self.krb5_conf.write_text(krb5_conf(self.realm, self.address, self.dns_domain,
                                            [self.cluster_address(c) for c in self.plan.clusters]))

    def _write_tls(self) -> None:
        write_tls(self.private / "tls", self.realm, self.dc_host, self.address)


def _new_password() -> str:
    # Random, and meets AD's complexity rule (three character classes). It starts with a letter: samba-tool takes the
    # password as a positional argument, and one starting with "-" (token_urlsafe can) is parsed as an option.
    return "Aa1-" + secrets.token_urlsafe(18)


def _free_block() -> str:
    """127.X.Y.1 with nothing on the DC's ports there, and X.Y random: parallel sandboxes get different blocks."""
    for _ in range(50):
        rng = secrets.SystemRandom()
        address = f"127.{rng.randint(100, 254)}.{rng.randint(1, 254)}.1"
        if all(port_is_free(port, address) for port in DC_PORTS):
            return address
    raise SandboxError("could not find a free 127.X.Y.1 address for the Samba AD DC")


# Runs under /usr/bin/python3 (samba's bindings). Reads {"config", "sam", "commands"} from stdin; prints
# "@@FAILED <cmd> <subcmd>" and exits 1 at the first failure.
