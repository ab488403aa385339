"""What a Samba AD DC sandbox writes: its smb.conf, the clients' krb5.conf, TLS certificates with a subjectAltName,
and the script that runs many samba-tool commands in one process."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import SandboxError
from .procs import find_binary, tail


def smb_conf(ad: Any) -> str:
    """The DC's own smb.conf (``ad``: the SambaAD): every path under its directory, on its address only."""
    d, tls = ad.provision_dir, ad.private / "tls"
    return f"""# kerb_jupyter sandbox: a Samba AD DC on {ad.address} only (no DNS, SMB, RPC)
[global]
    netbios name = {ad.host_name.upper()}
    workgroup = {ad.domain}
    realm = {ad.realm}
    server role = active directory domain controller
    server services = ldap, kdc
    interfaces = {ad.address}/8
    bind interfaces only = yes
    prefork children = 2
    private dir = {ad.private}
    lock directory = {d}
    state directory = {d / "state"}
    cache directory = {d / "cache"}
    binddns dir = {d / "bind-dns"}
    pid directory = {d / "run"}
    ncalrpc dir = {d / "run" / "ncalrpc"}
    winbindd socket directory = {d / "run" / "winbindd"}
    ntp signd socket directory = {d / "run" / "ntp_signd"}
    usershare path = {d / "usershares"}
    smb passwd file = {d / "private" / "smbpasswd"}
    log file = {ad.log_file}
    log level = 1
    tls enabled = yes
    tls keyfile = {tls / "key.pem"}
    tls certfile = {tls / "cert.pem"}
    tls cafile = {tls / "ca.pem"}
    kdc:user ticket lifetime = 10
    kdc:service ticket lifetime = 10
    kdc:renewal lifetime = 168
"""


def krb5_conf(realm: str, address: str, dns_domain: str, cluster_addresses: Sequence[str]) -> str:
    """The clients' krb5.conf: this DC only, no DNS lookups, the clusters' addresses mapped to the realm."""
    hosts = "".join(f"    {a} = {realm}\n" for a in cluster_addresses)
    return f"""[libdefaults]
    default_realm = {realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    forwardable = true
    renew_lifetime = 7d
    ticket_lifetime = 10h

[realms]
    {realm} = {{
        kdc = {address}
        admin_server = {address}
        kpasswd_server = {address}
    }}

[domain_realm]
    .{dns_domain} = {realm}
    {dns_domain} = {realm}
    localhost = {realm}
{hosts}"""


def write_tls(tls: Path, realm: str, dc_host: str, address: str) -> None:
    """A CA and a server certificate whose subjectAltName has the DC's name and address (first start only)."""
    if (tls / "cert.pem").exists():
        return
    tls.mkdir(mode=0o700, parents=True, exist_ok=True)
    openssl = find_binary("openssl", "openssl")
    days = "3650"
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", days, "-subj", f"/O=kerb_jupyter sandbox/CN={realm} sandbox CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "req.pem",
         "-subj", f"/O=kerb_jupyter sandbox/CN={dc_host}"],
        [openssl, "x509", "-req", "-in", "req.pem", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "cert.pem", "-days", days, "-extfile", "ext.cnf"],
    ]
    (tls / "ext.cnf").write_text(f"subjectAltName = DNS:{dc_host}, IP:{address}\n"
                                 "extendedKeyUsage = serverAuth\nbasicConstraints = CA:FALSE\n")
    for step in steps:
        res = subprocess.run(step, cwd=tls, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise SandboxError(f"openssl {step[1]} failed: {tail(res.stdout + res.stderr)}")
    for name in ("ca.key", "key.pem"):
        (tls / name).chmod(0o600)
    (tls / "ca.pem").chmod(0o644)


def scrub(text: str, commands: list[list[str]]) -> str:
    """Output with every password we passed replaced (samba-tool may echo its arguments)."""
    for cmd in commands:
        if cmd[:2] == ["user", "create"] and len(cmd) > 3:
            text = text.replace(cmd[3], "***")
        if "--adminpass" in cmd:
            text = text.replace(cmd[cmd.index("--adminpass") + 1], "***")
    return text


BATCH = r"""
import json, sys
doc = json.load(sys.stdin)
from samba.netcmd.main import cmd_sambatool
for argv in doc["commands"]:
    if argv[0] == "@ldbmodify":
        import ldb
        from samba.param import LoadParm
        from samba.samdb import SamDB
        from samba.auth import system_session
        lp = LoadParm(); lp.load(doc["config"])
        db = SamDB(url=doc["sam"], session_info=system_session(), lp=lp)
        try:
            db.modify_ldif(argv[1])
        except ldb.LdbError as e:
            print("@@FAILED ldbmodify -", e, flush=True); sys.exit(1)
        continue
    cmd = cmd_sambatool()
    try:
        rc = cmd._run("samba-tool", *argv, "--configfile=" + doc["config"])
    except SystemExit as e:
        rc = e.code
    except Exception as e:
        cmd.show_command_error(e)
        rc = 1
    sys.stdout.flush(); sys.stderr.flush()
    if rc:
        print("@@FAILED", argv[0], argv[1] if len(argv) > 1 else "", flush=True)
        sys.exit(1)
"""
