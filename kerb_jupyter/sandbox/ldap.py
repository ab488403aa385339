"""A throwaway MIT realm on the LDAP KDB backend (private slapd on 127.0.0.1): S4U2Proxy, delegation, AD-like groups."""

from __future__ import annotations

import gzip
import os
import secrets
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..core.errors import SandboxError
from .procs import Daemon, alive, claim_port, find_binary, free_port, port_is_free, start_daemon, tail
from .realm import MASTER_PASSWORD, Realm

LDAP_PACKAGES = "slapd ldap-utils krb5-kdc-ldap"
SCHEMA_CANDIDATES = (
    Path("/etc/ldap/schema/kerberos.schema"),
    Path("/usr/share/doc/krb5-kdc-ldap/kerberos.schema.gz"),
    Path("/usr/share/doc/krb5-kdc-ldap/kerberos.schema"),
)
SYSTEM_SCHEMA = Path("/etc/ldap/schema")
MODULE_DIR = Path("/usr/lib/ldap")


def make_tls(root: Path, names: Sequence[str] = ("localhost", "127.0.0.1")) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for ``names`` (DNS names or addresses) signed by it, with openssl:
    ``(ca.pem, server.pem, server.key)`` in ``root`` (kept when they exist). Raises SandboxError."""
    ca, cert, key = root / "ca.pem", root / "server.pem", root / "server.key"
    if cert.exists():
        return ca, cert, key
    sans = ",".join(("IP:" if n.replace(".", "").isdigit() else "DNS:") + n for n in names)
    (root / "server.ext").write_text(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\n"
                                     "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n")
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl = find_binary("openssl", "openssl")
    for cmd in (
        [openssl, "req", "-x509", *curve, "-days", "7", "-subj", "/CN=kerb_jupyter sandbox CA",
         "-keyout", str(root / "ca.key"), "-out", str(ca)],
        [openssl, "req", *curve, "-subj", f"/CN={names[0]}", "-keyout", str(key), "-out", str(root / "server.csr")],
        [openssl, "x509", "-req", "-in", str(root / "server.csr"), "-CA", str(ca), "-CAkey", str(root / "ca.key"),
         "-set_serial", str(int.from_bytes(secrets.token_bytes(8), "big")), "-days", "7",
         "-extfile", str(root / "server.ext"), "-out", str(cert)],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SandboxError(f"openssl failed (exit {res.returncode}): {tail(res.stdout + res.stderr)}")
    for path in (key, root / "ca.key"):
        path.chmod(0o600)
    return ca, cert, key


class Slapd(Daemon):
    """A private OpenLDAP server for one suffix, its config in ``root/slapd.conf`` (no cn=config, no system state).

    Loads MIT's Kerberos schema and the memberof overlay, so ``groupOfNames`` members get ``memberOf``. The root DN
    (for the KDC) bypasses the ACLs; ``reader_dn`` may read everything except keys and passwords. It listens on
    ``url`` (plain, for the KDC and the admin tools) and on ``ldaps_url`` with a certificate for 127.0.0.1 and
    localhost from its own CA (``ca_cert``), for the broker.
    """

    def __init__(self, root: Path, suffix: str = "dc=kerb,dc=test", port: int = 0, tls_port: int = 0) -> None:
        self.root = Path(root).resolve()
        self.suffix = suffix
        self.port = port
        self.tls_port = tls_port
        self.admin_dn = f"cn=admin,{suffix}"
        self.reader_dn = f"cn=reader,{suffix}"
        self.conf = self.root / "slapd.conf"
        self.data = self.root / "data"
        self.log_file = self.root / "slapd.log"
        self._admin_pw_file = self.root / "admin.password"
        self._reader_pw_file = self.root / "reader.password"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def ca_cert(self) -> Path:
        return self.root / "tls" / "ca.pem"

    @property
    def admin_password(self) -> str:
        return self._admin_pw_file.read_text()

    @property
    def reader_password(self) -> str:
        return self._reader_pw_file.read_text()

    def create(self) -> None:
        """Write the configuration (idempotent: a second call keeps the passwords and the data)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(exist_ok=True)
        self.data.chmod(0o700)
        for f in (self._admin_pw_file, self._reader_pw_file):
            if not f.exists():
                f.touch(0o600)
                f.write_text(secrets.token_urlsafe(18))
        if not self.port:
            self.port = free_port()
        if not self.tls_port:
            self.tls_port = free_port()
        (self.root / "tls").mkdir(mode=0o700, exist_ok=True)
        _, cert, key = make_tls(self.root / "tls")
        schema = self.root / "kerberos.schema"
        if not schema.exists():
            schema.write_bytes(_kerberos_schema())
        includes = "\n".join(f"include {SYSTEM_SCHEMA}/{n}.schema" for n in ("core", "cosine", "inetorgperson"))
        self.conf.write_text(
            f"""# kerb_jupyter sandbox slapd
{includes}
include {schema}
pidfile {self.root}/slapd.pid
argsfile {self.root}/slapd.args
TLSCACertificateFile {self.ca_cert}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
modulepath {MODULE_DIR}
moduleload back_mdb
moduleload memberof
sizelimit unlimited

database mdb
maxsize 268435456
suffix "{self.suffix}"
rootdn "{self.admin_dn}"
rootpw {self.admin_password}
directory {self.data}
index objectClass eq
index krbPrincipalName eq,pres,sub
index member,memberOf eq
overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE
access to attrs=krbPrincipalKey,krbPwdHistory,userPassword
    by anonymous auth
    by * none
access to *
    by dn.exact="{self.reader_dn}" read
    by * none
"""
        )

    def start(self) -> None:
        if alive(self.proc):
            return
        if not port_is_free(self.port):
            raise SandboxError(f"port 127.0.0.1:{self.port} for slapd is already in use")
        self.proc = start_daemon(
            "slapd", [find_binary("slapd", LDAP_PACKAGES), "-d", "32768", "-f", str(self.conf),
                      "-h", f"{self.url}/ {self.ldaps_url}/"],
            self.port, self.log_file, cwd=self.root,
        )

    # -- clients ------------------------------------------------------------------------------------
    def modify(self, ldif: str, add: bool = False) -> None:
        """Apply LDIF as the root DN (``add`` for plain entries without changetype)."""
        tool = "ldapadd" if add else "ldapmodify"
        self._client(tool, "-D", self.admin_dn, "-y", str(self._admin_pw_file), stdin=ldif)

    def search(self, base: str, filter_: str, *attrs: str) -> list[dict[str, list[str]]]:
        """Entries as ``{"dn": [dn], attr: [values]}``, bound as the read-only reader."""
        out = self._client("ldapsearch", "-LLL", "-o", "ldif-wrap=no", "-D", self.reader_dn,
                           "-y", str(self._reader_pw_file), "-b", base, filter_, *attrs)
        entries: list[dict[str, list[str]]] = []
        for block in out.strip().split("\n\n"):
            entry: dict[str, list[str]] = {}
            for line in block.splitlines():
                key, sep, value = line.partition(": ")
                if sep:
                    entry.setdefault(key, []).append(value)
            if entry:
                entries.append(entry)
        return entries

    def _client(self, tool: str, *args: str, stdin: str = "") -> str:
        env = {**os.environ, "LDAPNOINIT": "1"}  # ignore /etc/ldap/ldap.conf and ~/.ldaprc
        res = subprocess.run([find_binary(tool, LDAP_PACKAGES), "-x", "-H", self.url, *args], input=stdin,
                             capture_output=True, text=True, env=env, check=False)
        if res.returncode != 0:
            raise SandboxError(f"{tool} failed (exit {res.returncode}): {tail(res.stdout + res.stderr)}")
        return res.stdout


class LdapRealm(Realm):
    """A :class:`Realm` whose principals live in a private slapd, so the KDC does S4U2Proxy (DB2 does not).

    Layout: users ``uid=NAME,ou=People,SUFFIX`` (inetOrgPerson + krbPrincipalAux), groups ``cn=NAME,ou=Groups,SUFFIX``
    (groupOfNames; users get ``memberOf`` from the overlay), services and krbtgt in MIT's realm container.
    """

    backend = "ldap"

    def __init__(
        self,
        root: Path,
        realm: str = "KERB.TEST",
        port: int = 0,
        max_life: int = 10 * 3600,
        max_renewable_life: int = 7 * 86400,
        suffix: str = "dc=kerb,dc=test",
        ldap_port: int = 0,
    ) -> None:
        super().__init__(root, realm, port, max_life, max_renewable_life)
        self.slapd = Slapd(self.root / "slapd", suffix, ldap_port)
        self.suffix = suffix
        self.people = f"ou=People,{suffix}"
        self.groups = f"ou=Groups,{suffix}"
        self.container = f"cn=krbContainer,{suffix}"

    def create(self) -> None:
        """slapd's configuration, its base entries, the realm in LDAP and the KDC's configuration (idempotent)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.slapd.create()
        self.slapd.start()
        try:
            self.port = claim_port(self.port, "the KDC")
            self._write_configs()
            if not (self.root / "stash").exists():
                self._create_realm()
        except BaseException:
            self.slapd.stop()
            raise

    def _create_realm(self) -> None:
        top = self.suffix.split(",")[0].split("=", 1)[1]
        self.slapd.modify(
            f"""dn: {self.suffix}
objectClass: dcObject
objectClass: organization
dc: {top}
o: kerb_jupyter sandbox

dn: {self.slapd.reader_dn}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: reader
userPassword: {self.slapd.reader_password}

dn: {self.people}
objectClass: organizationalUnit
ou: People

dn: {self.groups}
objectClass: organizationalUnit
ou: Groups
""",
            add=True,
        )
        s = self.slapd
        self._run(find_binary("kdb5_ldap_util", LDAP_PACKAGES), "-D", s.admin_dn, "-w", s.admin_password,
                  "-H", s.url, "create", "-subtrees", self.people, "-sscope", "sub", "-r", self.realm,
                  "-s", "-P", MASTER_PASSWORD)
        # The KDC's bind password, in MIT's stash format "DN#{HEX}hex".
        stash = self.root / "ldap.stash"
        stash.touch(0o600)
        stash.write_text(f"{s.admin_dn}#{{HEX}}{s.admin_password.encode().hex()}\n")

    def _database(self) -> str:
        return "database_module = LDAP"

    def _db_modules(self) -> str:
        s = self.slapd
        return f"""
[dbmodules]
    LDAP = {{
        db_library = kldap
        ldap_servers = {s.url}
        ldap_kdc_dn = {s.admin_dn}
        ldap_kadmind_dn = {s.admin_dn}
        ldap_service_password_file = {self.root}/ldap.stash
        ldap_kerberos_container_dn = {self.container}
        ldap_conns_per_server = 2
        disable_last_success = true
        disable_lockout = true
    }}
"""

    # -- principals and groups ----------------------------------------------------------------------
    def add_user(self, name: str, groups: Iterable[str] = (), password: str | None = None) -> str:
        """A person entry with a principal: without keys (only a broker's S4U can get tickets for it) unless
        ``password`` is given; ``groups`` are created if needed and get the user as a member."""
        dn = self.user_dn(name)
        self.slapd.modify(f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {name}\ncn: {name}\nsn: {name}\n", add=True)
        princ = self.principal(name)
        key = f"-pw {password}" if password else "-nokey"
        self.kadmin(f"addprinc {key} -x dn={dn} -maxlife {self.max_life}s "
                    f"-maxrenewlife {self.max_renewable_life}s +renewable {princ}")
        for group in groups:
            self.add_member(group, name)
        return princ

    def add_delegating_service(self, name: str, allowed_to: Sequence[str], keytab: Path | None = None) -> str:
        """A service principal trusted for protocol transition (S4U2Self, ``+ok_to_auth_as_delegate``) and for
        constrained delegation (S4U2Proxy) to the principals ``allowed_to`` (``krbAllowedToDelegateTo``)."""
        princ = self.add_principal(name, keytab=keytab)
        self.modify_principal(princ, "+ok_to_auth_as_delegate")
        self.set_delegation(princ, allowed_to)
        return princ

    def set_delegation(self, name: str, allowed_to: Sequence[str]) -> None:
        """Replace the service's ``krbAllowedToDelegateTo`` list."""
        values = "".join(f"krbAllowedToDelegateTo: {self.principal(t)}\n" for t in allowed_to)
        self.slapd.modify(f"dn: {self.principal_dn(name)}\nchangetype: modify\n"
                          f"replace: krbAllowedToDelegateTo\n{values}")

    def add_member(self, group: str, user: str) -> None:
        dn, member = self.group_dn(group), self.user_dn(user)
        if self.slapd.search(self.groups, f"(cn={group})", "cn"):
            self.slapd.modify(f"dn: {dn}\nchangetype: modify\nadd: member\nmember: {member}\n")
        else:
            self.slapd.modify(f"dn: {dn}\nobjectClass: groupOfNames\ncn: {group}\nmember: {member}\n", add=True)

    def groups_of(self, user: str) -> list[str]:
        """Group DNs of a user, from ``memberOf`` (what a broker reads; AD has the same attribute)."""
        found = self.slapd.search(self.user_dn(user), "(objectClass=*)", "memberOf")
        return sorted(found[0].get("memberOf", [])) if found else []

    def user_dn(self, name: str) -> str:
        return f"uid={name},{self.people}"

    def group_dn(self, name: str) -> str:
        return f"cn={name},{self.groups}"

    def principal_dn(self, name: str) -> str:
        princ = self.principal(name)
        found = self.slapd.search(self.suffix, f"(krbPrincipalName={princ})", "dn")
        if not found:
            raise SandboxError(f"no LDAP entry for the principal {princ}")
        return found[0]["dn"][0]

    # -- daemons ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.slapd.start()
        super().start()

    def stop(self) -> None:
        super().stop()
        self.slapd.stop()

    @property
    def running(self) -> bool:
        return super().running or self.slapd.running


def _kerberos_schema() -> bytes:
    for path in SCHEMA_CANDIDATES:
        if path.exists():
            data = path.read_bytes()
            return gzip.decompress(data) if path.suffix == ".gz" else data
    raise SandboxError(f"MIT's Kerberos LDAP schema was not found: install the Debian packages {LDAP_PACKAGES}")

