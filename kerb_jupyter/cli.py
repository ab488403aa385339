"""The ``kerb-jupyter`` command: ``sandbox`` (demo realm + database [+ JupyterLab]), ``status``, ``doctor``."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .core.errors import KerbJupyterError

if TYPE_CHECKING:
    from .sandbox import Sandbox
    from .sandbox.ad import ADSandbox
    from .sandbox.broker import BrokerSandbox


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kerb-jupyter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sb = sub.add_parser("sandbox", help="start a throwaway Kerberos realm and PostgreSQL (and JupyterLab)")
    sb.add_argument("--dir", help="state directory (default: a new temporary directory, removed on exit)")
    sb.add_argument("--no-lab", action="store_true", help="start only the realm and the database(s); print "
                    "one JSON line with the environment a Jupyter server needs, then wait for Ctrl-C")
    sb.add_argument("--clusters", help="comma-separated cluster names (one PostgreSQL server each; default: "
                    "analytics,finance; with --ad: analytics,finance,orders, the only names its directory plans)")
    sb.add_argument("--kdc-port", type=int, default=0, help="KDC port (default: a free one)")
    sb.add_argument("--pg-port", type=int, action="append", default=[], help="PostgreSQL port, once per cluster")
    sb.add_argument("--lab-port", type=int, default=0, help="JupyterLab port (default: a free one)")
    sb.add_argument("--broker", action="store_true", help="no user secret anywhere: an LDAP-backed realm, moto "
                    "STS for AWS, the credential broker, and a notebook configuration whose source is the broker")
    sb.add_argument("--ad", action="store_true", help="Active Directory: a Samba AD DC on a private loopback "
                    "address (users, nested groups, delegation), PostgreSQL clusters whose service keytabs come "
                    "from AD, and a keytab-source configuration for alice (first start ~1-2 min)")
    st = sub.add_parser("status", help="show the ticket in the shared cache and the keeper's state")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    kc = sub.add_parser("krb5-conf", help="print a krb5.conf for an Active Directory realm (for lifecycle scripts)")
    kc.add_argument("--realm", required=True, help="the AD realm, e.g. CORP.EXAMPLE.COM")
    kc.add_argument("--kdc", action="append", required=True, help="a domain controller host[:port]; repeat")
    kc.add_argument("--domain", action="append", default=[], help="DNS domain mapped to the realm; repeat "
                    "(default: the realm in lower case; .rds.amazonaws.com is always mapped, for Aurora)")
    kc.add_argument("--admin-server", help="admin and kpasswd server (default: the first --kdc)")
    kc.add_argument("--trusted-realm", action="append", default=[], metavar="REALM=KDC[,KDC]",
                    help="an on-premises realm the AD realm trusts (adds [realms] and [capaths]); repeat")
    dr = sub.add_parser("doctor", help="check everything between installed and working; non-zero exit on failure")
    dr.add_argument("clusters", nargs="*", metavar="CLUSTER", help="clusters to check (default: all configured)")
    dr.add_argument("--json", action="store_true", help="machine-readable output")
    dr.add_argument("--config", help="configuration file (default: $KERB_JUPYTER_CONFIG or "
                    "~/.jupyter/kerb_jupyter.json)")
    dr.add_argument("--timeout", type=float, default=3.0, help="seconds per network probe (default 3)")
    dr.add_argument("--only", choices=["extension"], help="run one check only (lifecycle scripts use 'extension')")
    wh = sub.add_parser("wheelhouse", help="build every wheel kerb_jupyter needs into DIR, for installs with no "
                        "compiler and no internet")
    wh.add_argument("dir", help="directory to fill (created if missing)")
    wh.add_argument("--spec", default="", help="what to build (default: this installed kerb_jupyter's own wheel "
                    "plus its dependencies)")
    bk = sub.add_parser("broker", help="run the credential broker (S4U tickets for AWS-verified callers)")
    bk.add_argument("--config", required=True, help="the broker's JSON configuration (see the README)")
    args = parser.parse_args(argv)
    try:
        if args.command == "doctor":
            return run_doctor_command(args)
        if args.command == "wheelhouse":
            from .wheelhouse import build_wheelhouse

            build_wheelhouse(Path(args.dir), args.spec or None)
            return 0
        if args.command == "broker":
            from .broker.app import run as run_broker

            run_broker(args.config)
            return 0
        if args.command == "sandbox":
            return run_sandbox(args)
        if args.command == "krb5-conf":
            print(krb5_conf(args.realm, args.kdc, args.domain, args.admin_server, args.trusted_realm), end="")
            return 0
        return show_status(args.json)
    except KerbJupyterError as err:
        print(f"kerb-jupyter: {err}", file=sys.stderr)
        return 1


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_sandbox(args: argparse.Namespace) -> int:
    from .core.errors import SandboxError
    from .sandbox import Sandbox
    from .sandbox.procs import free_port, stop_process

    if args.ad and args.broker:
        raise SandboxError("--ad and --broker are separate sandboxes: choose one")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    temporary = args.dir is None
    root = Path(args.dir or tempfile.mkdtemp(prefix="kerb-jupyter-sandbox-"))
    clusters = [c.strip() for c in (args.clusters or "analytics,finance").split(",") if c.strip()]
    sandbox: Sandbox | BrokerSandbox | ADSandbox
    if args.ad:
        from .sandbox.ad import ADSandbox

        sandbox = ADSandbox(root, clusters=clusters if args.clusters else None)
    elif args.broker:
        from .sandbox.broker import BrokerSandbox

        sandbox = BrokerSandbox(root, clusters=clusters)
    else:
        sandbox = Sandbox(root, clusters=clusters, kdc_port=args.kdc_port, pg_ports=args.pg_port)
    lab: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        sandbox.start()
        ready = time.monotonic() - started
        if args.no_lab:
            print(json.dumps(sandbox.describe()), flush=True)
            print(f"kerb-jupyter sandbox ready in {ready:.1f} s; Ctrl-C stops it", file=sys.stderr, flush=True)
            while True:
                signal.pause()
        lab = _start_lab(sandbox, args.lab_port or free_port())
        return lab.wait()
    except KeyboardInterrupt:
        print("kerb-jupyter sandbox: stopping", file=sys.stderr)
        return 0
    finally:
        stop_process(lab, timeout=15)
        sandbox.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def _start_lab(sandbox: Sandbox | BrokerSandbox | ADSandbox, port: int) -> subprocess.Popen[bytes]:
    notebooks = sandbox.root / "notebooks"
    notebooks.mkdir(exist_ok=True)
    demo = Path(__file__).parent / "sandbox" / "demo.ipynb"
    if not (notebooks / demo.name).exists():
        shutil.copy(demo, notebooks / demo.name)
    env = {**os.environ, **sandbox.env}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.root_dir={notebooks}", "--ServerApp.jpserver_extensions={'kerb_jupyter': True}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    print(f"kerb-jupyter sandbox: realm {sandbox.realm.realm}, principal {sandbox.principal}, clusters "
          f"{', '.join(sandbox.servers)}; starting JupyterLab on http://127.0.0.1:{port}/lab "
          "(the login URL with its token follows)", file=sys.stderr, flush=True)
    return subprocess.Popen(cmd, env=env, cwd=notebooks)


_HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


def krb5_conf(realm: str, kdcs: list[str], domains: list[str], admin_server: str | None = None,
              trusted: list[str] | None = None) -> str:
    """A client krb5.conf as Aurora + AWS Managed Microsoft AD want it. Raises ConfigError on odd input.

    ``trusted``: on-premises realms trusted by the AD realm, as ``REALM=kdc[,kdc]``; each gets a [realms] entry
    and a direct [capaths] path through the AD realm.
    """
    from .core.errors import ConfigError

    realm = realm.upper()
    other: dict[str, list[str]] = {}
    for spec in trusted or []:
        name, _, hosts = spec.partition("=")
        other[name.upper()] = [h for h in hosts.split(",") if h]
    for name in [realm, *other]:
        if not re.fullmatch(r"[A-Z0-9][A-Z0-9.-]*", name):
            raise ConfigError(f"{name!r} is not a Kerberos realm name")
    for host in kdcs + domains + [admin_server or ""] + [h for hs in other.values() for h in hs]:
        if host and not _HOST.match(host.lstrip(".")):
            raise ConfigError(f"{host!r} is not a host name")
    maps = [*(domains or [realm.lower()]), ".rds.amazonaws.com"]
    mapping = "\n".join(f"    {d if d.startswith('.') else '.' + d} = {realm}\n    {d.lstrip('.')} = {realm}"
                        for d in maps)
    admin = admin_server or kdcs[0].split(":")[0]
    blocks = [f"    {realm} = {{\n" + "".join(f"        kdc = {k}\n" for k in kdcs)
              + f"        admin_server = {admin}\n        kpasswd_server = {admin}\n    }}"]
    blocks += [f"    {name} = {{\n" + "".join(f"        kdc = {k}\n" for k in hosts) + "    }"
               for name, hosts in other.items()]
    capaths = ""
    if other:
        paths = [f"    {name} = {{\n        {realm} = .\n    }}\n" for name in other]
        paths.append(f"    {realm} = {{\n" + "".join(f"        {name} = .\n" for name in other) + "    }\n")
        capaths = "\n[capaths]\n" + "".join(paths)
    aes = "aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96"
    return f"""[libdefaults]
    default_realm = {realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    forwardable = true
    renew_lifetime = 7d
    ticket_lifetime = 10h
    udp_preference_limit = 1
    default_tkt_enctypes = {aes}
    default_tgs_enctypes = {aes}
    permitted_enctypes = {aes}

[realms]
{chr(10).join(blocks)}

[domain_realm]
{mapping}
{capaths}"""


def run_doctor_command(args: argparse.Namespace) -> int:
    from .doctor.checks import find_servers, server_check
    from .doctor.run import Report, run_doctor

    if args.only == "extension":  # lifecycle scripts: exit 0 only when a running server has it loaded
        check = server_check(find_servers(), args.timeout)
        print(json.dumps(check.as_dict()) if args.json else repr(Report([check])))
        return 0 if check.status == "ok" else 1
    report = run_doctor(args.clusters, args.config, timeout=args.timeout)
    print(json.dumps(report.as_dict(), indent=2) if args.json else repr(report))
    return 0 if report.ok else 1


def show_status(as_json: bool) -> int:
    """The shared ticket and the keeper's state; a configuration problem (a KERB_JUPYTER_CONFIG naming a
    file that does not exist, a malformed file) is said first, then what the default locations hold."""
    from .core.config import ENV_CONFIG, Settings, load_settings
    from .core.errors import ConfigError
    from .core.state import credential_status

    config_error: ConfigError | None = None
    try:
        settings = load_settings(os.environ.get(ENV_CONFIG) or None)
    except ConfigError as err:
        missing = os.environ.get(ENV_CONFIG) and "does not exist" in str(err)
        config_error = ConfigError(f"{err} (named by {ENV_CONFIG})") if missing else err
        settings = Settings(path=None)
    status = credential_status(settings)
    if as_json:
        print(json.dumps({
            "config_error": {"code": config_error.code, "message": str(config_error)} if config_error else None,
            "cache": status.cache,
            "ticket": status.ticket.as_dict() if status.ticket else None,
            "keeper": status.keeper,
            "error": {"code": status.error.code, "message": str(status.error)} if status.error else None,
        }, indent=2))
    else:
        if config_error is not None:
            print(f"configuration: {config_error}")
        print(repr(status))
    return 0 if status.ticket and config_error is None else 1


if __name__ == "__main__":
    sys.exit(main())
