"""The doctor's per-cluster checks (TCP, service ticket, login, transport, ``rds_ad``), the broker's health and TLS,
and the running-server check."""

from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core import tickets
from ..core.config import ClusterConfig, Settings
from ..core.errors import KerbJupyterError
from ..core.grants import grant_problem
from ..sql import db
from .krbprobe import Krb5Conf, tcp_open


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix, **self.data}


def _c(name: str, status: str, detail: str, fix: str = "", **data: Any) -> Check:
    return Check(name, status, detail, fix, data)


def cluster_checks(settings: Settings, name: str, conf: Krb5Conf | None, ticket: tickets.TicketInfo | None,
                   principal: str | None, timeout: float, refused: Any = None) -> list[Check]:
    """``refused``: the keeper's last ``refused`` map (broker source), so a refused cluster is named with its reason."""
    try:
        cluster = settings.cluster(name)
    except KerbJupyterError as err:
        return [_c(f"cluster {name}", "fail", str(err), "use one of the configured names, or add the cluster "
                      "to the configuration file's 'clusters'")]
    where = f"{cluster.host}:{cluster.port}"
    out = []
    try:
        tcp_open(cluster.host, cluster.port, timeout)
        out.append(_c(f"{name}.tcp", "ok", f"{where} accepts connections"))
    except OSError as err:
        reason = "refused (nothing listens)" if isinstance(err, ConnectionRefusedError) else (str(err) or "timeout")
        return [*out, _c(f"{name}.tcp", "fail", f"cannot reach {where}: {reason}",
                            "check the endpoint and port; the notebook's security group must reach the cluster's, "
                            "and the cluster must be running")]
    if ticket is None:
        return [*out, _c(f"{name}.service_ticket", "skip", "no valid ticket in the shared cache (see above)")]
    problem = grant_problem(ticket, cluster, refused)  # a broker cache without this cluster's ticket
    if problem is not None:
        who = ticket.principal
        fix = (f"the KDC refused the broker's delegation for {who}: the broker's administrator fixes the reason "
               "named (account flags, msDS-AllowedToDelegateTo); the keeper asks again by itself"
               if problem[0] == "cluster_refused" else
               f"ask the broker's administrator to grant this cluster to {who} (the broker's policy rule and "
               "groups), and to name it the same in the broker's 'clusters'")
        return [*out, _c(f"{name}.service_ticket", "fail", problem[1], fix, code=problem[0])]
    out.append(service_ticket_check(cluster, conf, ticket))
    if out[-1].status == "fail":
        return out
    out.extend(login_checks(cluster, principal or ticket.principal, settings, ticket.cache))
    return out


def service_ticket_check(cluster: ClusterConfig, conf: Krb5Conf | None, ticket: tickets.TicketInfo) -> Check:
    """Ask the KDC for the cluster's service ticket, the way libpq will, and name the SPN asked for."""
    import gssapi

    realm = conf.realm_for_host(cluster.host) if conf else None
    spn = f"{cluster.krbsrvname}/{cluster.host}@{realm or '<default realm>'}"
    canon_mode = (conf.libdefaults.get("dns_canonicalize_hostname", "true") if conf else "true").lower()
    if canon_mode == "false":
        canon = f"host name used as typed (dns_canonicalize_hostname = false): {cluster.host}"
    else:
        try:
            canonical = socket.getaddrinfo(cluster.host, None, flags=socket.AI_CANONNAME)[0][3] or cluster.host
        except OSError:
            canonical = cluster.host
        canon = f"dns_canonicalize_hostname = {canon_mode}: {cluster.host} canonicalises to {canonical}"
    name = f"{cluster.name}.service_ticket"
    try:
        target = gssapi.Name(f"{cluster.krbsrvname}@{cluster.host}", gssapi.NameType.hostbased_service)
        creds = gssapi.Credentials(usage="initiate", store={b"ccache": f"FILE:{ticket.cache}".encode()})
        gssapi.SecurityContext(name=target, creds=creds, usage="initiate", mech=gssapi.MechType.kerberos).step()
    except gssapi.raw.misc.GSSError as err:
        text = err.gen_message() if hasattr(err, "gen_message") else str(err)
        if "not found in Kerberos database" in text:
            return _c(name, "fail", f"the KDC has no service principal {spn} ({canon})",
                         "use the host name the SPN was registered for (the cluster endpoint, not an IP or a CNAME) "
                         "and the right krbsrvname; on Aurora the SPN is created when the cluster joins the "
                         "directory", spn=spn)
        if "Cannot contact any KDC" in text or "Cannot find KDC" in text:
            return _c(name, "fail", f"cannot reach a KDC for {spn}: {text}",
                         "check krb5.conf's [realms] and [domain_realm] (the database host must map to the realm)",
                         spn=spn)
        return _c(name, "fail", f"no service ticket for {spn}: {text}", "see the ticket and KDC checks above",
                     spn=spn)
    return _c(name, "ok", f"service ticket for {spn} ({canon})", spn=spn)


def login_checks(cluster: ClusterConfig, principal: str, settings: Settings, cache: str) -> list[Check]:
    name = cluster.name
    saved = os.environ.get("KRB5CCNAME")
    os.environ["KRB5CCNAME"] = f"FILE:{cache}"  # libpq reads it per connection: the shared cache, as kernels do
    try:
        conn = db.connect(cluster, principal, settings)
    except KerbJupyterError as err:
        fix = "see the error; a missing login role is the common case"
        if err.code == "auth_failed":
            fix = (f'ask the DBA for a login role named exactly "{cluster.user or principal}" (realm in upper case): '
                   f'CREATE USER "{cluster.user or principal}" WITH LOGIN; GRANT rds_ad TO it on Aurora/RDS')
        return [_c(f"{name}.login", "fail", str(err), fix, code=err.code)]
    finally:
        if saved is None:
            os.environ.pop("KRB5CCNAME", None)
        else:
            os.environ["KRB5CCNAME"] = saved
    with conn:
        user = conn.execute("SELECT current_user").fetchone()
        gss = conn.execute("SELECT gss_authenticated, encrypted FROM pg_stat_gssapi "
                           "WHERE pid = pg_backend_pid()").fetchone()
        ssl = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        has_rds_ad = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_ad')").fetchone()
        member = (conn.execute("SELECT pg_has_role(current_user, 'rds_ad', 'member')").fetchone()
                  if has_rds_ad and has_rds_ad[0] else None)
    current = user[0] if user else "?"
    out = [_c(f"{name}.login", "ok", f"logged in as {current!r}"
                 + (" with Kerberos" if gss and gss[0] else " (NOT authenticated by Kerberos)"),
                 current_user=current, gss_authenticated=bool(gss and gss[0]))]
    if gss and gss[1]:
        out.append(_c(f"{name}.transport", "ok", "GSS encryption in use", encryption="gss"))
    elif ssl and ssl[0]:
        out.append(_c(f"{name}.transport", "ok", f"TLS in use ({ssl[1]})", encryption="tls"))
    else:
        out.append(_c(f"{name}.transport", "warn", "the connection is not encrypted",
                         "set sslmode=require (fast) or gssencmode=require for the cluster", encryption="none"))
    if member is None:
        out.append(_c(f"{name}.rds_ad", "skip", "no rds_ad role on this server (not Aurora/RDS)"))
    else:
        ok = bool(member[0])
        out.append(_c(f"{name}.rds_ad", "ok" if ok else "warn",
                         f"{current} is {'a' if ok else 'NOT a'} member of rds_ad",
                         "" if ok else f'GRANT rds_ad TO "{current}" (Kerberos logins on RDS need it)'))
    return out


def broker_check(spec: dict[str, Any], timeout: float) -> Check:
    """The broker source: TCP, then TLS against ``ca_bundle`` (or the system store), then ``GET /healthz``."""
    url = str(spec.get("url", "")).rstrip("/")
    parts = urlsplit(url)
    host, https = parts.hostname or "", parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    ca = spec.get("ca_bundle")
    trust = f"ca_bundle {ca}" if ca else "the system CA store (no ca_bundle set)"
    ctx = None
    if https:
        try:
            ctx = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as err:
            return _c("source", "fail", f"broker {url}: {trust} cannot be read as PEM certificates: {err}",
                      "point source.ca_bundle at the PEM file of the CA that signed the broker's certificate")
    try:
        if ctx is None:
            tcp_open(host, port, timeout)
        tls = _tls_handshake(host, port, ctx, timeout) if ctx is not None else "plain http (loopback only)"
    except ssl.SSLCertVerificationError as err:
        return _c("source", "fail", f"broker {url}: its TLS certificate is not trusted by {trust}: "
                  f"{err.verify_message or err.reason}", "set source.ca_bundle to the CA that signed the broker's "
                  "certificate (PEM), and use the host name the certificate names", tls="untrusted")
    except ssl.SSLError as err:
        return _c("source", "fail", f"broker {url}: TLS handshake failed: {err.reason or err}",
                  "the broker must serve TLS 1.2 or later on this port (listen.tls_cert/tls_key)", tls="failed")
    except OSError as err:
        reason = "connection refused (the broker is down or not listening there)" if isinstance(
            err, ConnectionRefusedError) else (str(err) or type(err).__name__)
        return _c("source", "fail", f"broker {url} cannot be reached: {reason}",
                  "start the broker (systemctl status kerb-jupyter-broker); the notebook's security group must "
                  f"reach it on TCP {port}", reachable=False)
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=timeout, context=ctx) as resp:  # noqa: S310 - checked
            doc = json.loads(resp.read(65536))
    except urllib.error.HTTPError as err:
        try:
            answer = json.loads(err.read(4096))
        except ValueError:
            answer = None
        status = (answer.get("status") if isinstance(answer, dict) else None) or err.reason
        return _c("source", "fail", f"broker {url}: /healthz answers {err.code} ({status}); {tls}",
                  "see the broker's log (store_unavailable: its Redis cannot be reached)", health=err.code)
    except (OSError, ValueError) as err:
        return _c("source", "fail", f"broker {url}: /healthz did not answer: {err}", "see the broker's log")
    doc = doc if isinstance(doc, dict) else {}
    reload_error = bool(doc.get("policy_reload_error"))
    why = str(doc.get("policy_error") or "")
    detail = (f"broker {url}: {tls}; /healthz {doc.get('status')} ({doc.get('policy_rules', '?')} policy rule(s)"
              + (f"; its last policy reload FAILED, the old policy is in force: {why[:300]})" if reload_error
                 else ")"))
    return _c("source", "warn" if reload_error else "ok", detail,
              "fix the broker's policy file and send it SIGHUP again" if reload_error else "", health=200)


def _tls_handshake(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> str:
    """Verify the broker's certificate and host name; a line naming the protocol, subject and expiry. Raises."""
    with socket.create_connection((host, port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        cert = tls.getpeercert() or {}
        version = tls.version()
    subject = dict(x[0] for x in cert.get("subject", ()) if x)  # type: ignore[misc]
    until = cert.get("notAfter")
    expiry = (datetime.fromtimestamp(ssl.cert_time_to_seconds(str(until)), timezone.utc).strftime("%Y-%m-%d")
              if until else "?")
    return f"TLS verified ({version}, certificate for {subject.get('commonName', host)} valid until {expiry})"


def find_servers(runtime_dir: Path | None = None) -> list[dict[str, Any]]:
    """The running Jupyter servers' info files (``jpserver-*.json``) whose process is alive."""
    if runtime_dir is None:
        from jupyter_core.paths import jupyter_runtime_dir

        runtime_dir = Path(jupyter_runtime_dir())
    found = []
    for path in sorted(runtime_dir.glob("jpserver-*.json")):
        try:
            info = json.loads(path.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found.append(info)
    return found


def server_check(servers: list[dict[str, Any]], timeout: float) -> Check:
    """Ask each running server for the extension's status endpoint: 200 means it is loaded."""
    if not servers:
        return _c("extension", "warn", "no running Jupyter server found in the runtime directory",
                     "run the doctor where the server runs (same user, same JUPYTER_RUNTIME_DIR), or start it", pids=[])
    results, loaded_in = [], []
    for info in servers:
        url = str(info.get("url", "")).rstrip("/") + "/kerb-jupyter/api/status"
        request = urllib.request.Request(url)  # noqa: S310 - a local server's own URL
        if info.get("token"):
            request.add_header("Authorization", f"token {info['token']}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:  # noqa: S310
                doc = json.loads(resp.read())
            loaded_in.append(info.get("pid"))
            results.append((True, f"loaded in the server pid {info.get('pid')} ({info.get('version', '?')}), "
                                  f"its keeper is {doc.get('state')!r}"))
        except urllib.error.HTTPError as err:
            loaded = err.code != 404
            results.append((loaded, f"server pid {info.get('pid')} answers {err.code} at {url}"))
        except (OSError, ValueError) as err:
            results.append((False, f"server pid {info.get('pid')} at {url}: {err}"))
    ok = any(r[0] for r in results)
    return _c("extension", "ok" if ok else "fail", "; ".join(r[1] for r in results),
                 "" if ok else "enable it (`jupyter server extension enable kerb_jupyter`) in the server's env, "
                 "then restart the server; check the server log for an import error", pids=loaded_in)
