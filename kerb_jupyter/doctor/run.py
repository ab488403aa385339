"""``kerb-jupyter doctor``: every check between "installed" and "my query runs", in order, each failure with its fix.

Host checks (configuration, krb5.conf, DNS, KDC ports, clock, identity, principal, credential source, the
shared cache, the keeper, the install record, the running server) come first, then one group per cluster
(TCP, service ticket, login, transport, ``rds_ad``). Nothing here prints a secret; no server imports.

With the broker source the expectations change: no principal is configured (the broker says who the user is),
the cache holds service tickets that are not renewable (the keeper asks the broker again), the notebook need not
reach a KDC itself, the broker's TLS and ``/healthz`` are checked, and a cluster the broker did not grant (or the
KDC refused, with the broker's reason) is named as such.
"""

from __future__ import annotations

import html
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..core import tickets
from ..core.config import Settings, load_settings
from ..core.errors import KerbJupyterError
from ..core.grants import describe_refused, parse_refused
from ..core.state import cache_path, keeper_state
from .checks import Check, broker_check, cluster_checks, find_servers, server_check
from .krbprobe import KRB_ERROR_NAMES, Krb5Conf, krb5_conf_path, parse_krb5_conf, probe_kdc, split_host_port, tcp_open

INSTALL_RECORD = "kerb_jupyter_install.json"
_MARK = {"ok": "✔", "warn": "!", "fail": "✘", "skip": "-"}


class Report:
    """The doctor's findings, in order; ``ok`` is False when any check failed."""

    def __init__(self, checks: list[Check]) -> None:
        self.checks = checks

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def get(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.as_dict() for c in self.checks]}

    def lines(self) -> list[str]:
        out = []
        for c in self.checks:
            out.append(f"{_MARK[c.status]} {c.name}: {c.detail}")
            if c.fix and c.status in ("fail", "warn"):
                out.append(f"    fix: {c.fix}")
        failed = sum(c.status == "fail" for c in self.checks)
        out.append("all checks passed" if self.ok else f"{failed} check(s) failed")
        return out

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        colour = {"ok": "#1a7f37", "warn": "#b76e00", "fail": "#cf222e", "skip": "#57606a"}
        rows = []
        for c in self.checks:
            fix = f"<div style='margin-left:2em'>fix: {html.escape(c.fix)}</div>" if c.fix and c.status != "ok" else ""
            rows.append(f"<div class='kerbdoctor-{c.status}' style='color:{colour[c.status]}'>{_MARK[c.status]} "
                        f"<b>{html.escape(c.name)}</b>: {html.escape(c.detail)}</div>{fix}")
        return "<div class='kerbdoctor'>" + "".join(rows) + "</div>"


class Doctor:
    """Runs the checks. ``clock`` (Unix seconds) is injectable so that a skewed clock can be tested."""

    def __init__(self, config_path: str | Path | None = None, *, clock: Callable[[], float] = time.time,
                 timeout: float = 3.0, runtime_dir: Path | None = None) -> None:
        self.config_path = config_path
        self.clock = clock
        self.timeout = timeout
        self.runtime_dir = runtime_dir
        self.checks: list[Check] = []
        self.settings: Settings | None = None
        self.conf: Krb5Conf | None = None
        self.principal: str | None = None
        self.ticket: tickets.TicketInfo | None = None

    @property
    def broker(self) -> bool:
        """The credential source is the broker (tickets for clusters, no principal, nothing renewable)."""
        source = self.settings.source if self.settings is not None else None
        return bool(source) and isinstance(source, dict) and source.get("type") == "broker"

    def add(self, name: str, status: str, detail: str, fix: str = "", **data: Any) -> Check:
        check = Check(name, status, detail, fix, data)
        self.checks.append(check)
        return check

    def run(self, clusters: Sequence[str] = ()) -> Report:
        self.checks = []
        self._config()
        self._krb5_conf()
        self._kdcs()
        self._principal()
        self._source()
        self._ticket()
        self._keeper()
        self._install_record()
        self.checks.append(server_check(find_servers(self.runtime_dir), self.timeout))
        if self.settings is not None:
            names = list(clusters) or list(self.settings.clusters)
            if not names:
                self.add("clusters", "warn", "no clusters are configured", "add a 'clusters' section to the "
                         "configuration file (name -> host, port, dbname)")
            refused = (keeper_state(self.settings) or {}).get("refused") if self.broker else None
            for name in names:
                self.checks.extend(cluster_checks(self.settings, name, self.conf, self.ticket, self.principal,
                                                  self.timeout, refused))
        return Report(self.checks)

    # -- host ----------------------------------------------------------------------------------------
    def _config(self) -> None:
        try:
            self.settings = load_settings(self.config_path, required=True)
        except KerbJupyterError as err:
            self.add("config", "fail", str(err), "write the JSON configuration (see README 'Configuration') at "
                     "$KERB_JUPYTER_CONFIG or ~/.jupyter/kerb_jupyter.json; the lifecycle script writes it")
            return
        s = self.settings
        self.add("config", "ok", f"{s.path}: {len(s.clusters)} cluster(s), state in {s.state_dir}", path=str(s.path))

    def _krb5_conf(self) -> None:
        path = krb5_conf_path()
        try:
            self.conf = parse_krb5_conf(path)
        except FileNotFoundError:
            self.add("krb5_conf", "fail", f"{path} does not exist", "write one with `kerb-jupyter krb5-conf "
                     "--realm REALM --kdc DC` and point KRB5_CONFIG at it (the server and its kernels need it)")
            return
        except (OSError, ValueError, UnicodeDecodeError) as err:
            self.add("krb5_conf", "fail", f"{path} is unreadable or malformed: {err}",
                     "regenerate it with `kerb-jupyter krb5-conf`")
            return
        realm = self._wanted_realm()
        known = list(self.conf.realms)
        if not realm:
            self.add("krb5_conf", "fail", f"{path}: no default_realm and no principal to take a realm from",
                     "set default_realm in [libdefaults]")
        elif realm not in self.conf.realms:
            near = [r for r in known if r.upper() == realm.upper()]
            if near:
                self.add("krb5_conf", "fail", f"{path} defines realm {near[0]!r} but the principal's realm is "
                         f"{realm!r}: Kerberos realm names are case-sensitive",
                         "write the realm in upper case everywhere (AD realms are the DNS domain in upper case)",
                         realm=realm)
            elif not self.conf.flag("dns_lookup_kdc", False):
                self.add("krb5_conf", "fail", f"{path} has no [realms] entry for {realm} and dns_lookup_kdc is off"
                         f" (realms listed: {', '.join(known) or 'none'})",
                         f"add {realm} = {{ kdc = <domain controller> }} (`kerb-jupyter krb5-conf`)")
            else:
                self.add("krb5_conf", "ok", f"{path}: {realm} found through DNS SRV records (dns_lookup_kdc on)")
        else:
            canon = self.conf.libdefaults.get("dns_canonicalize_hostname", "true (default)")
            self.add("krb5_conf", "ok", f"{path}: realm {realm}, KDCs {', '.join(self._kdc_entries(realm))}, "
                     f"dns_canonicalize_hostname = {canon}", path=str(path))

    def _wanted_realm(self) -> str | None:
        principal = None
        if self.settings is not None:
            principal = self.settings.principal or (keeper_state(self.settings) or {}).get("principal")
        if isinstance(principal, str) and "@" in principal:
            return principal.rsplit("@", 1)[1]
        return self.conf.libdefaults.get("default_realm") if self.conf else None

    def _kdc_entries(self, realm: str) -> list[str]:
        return (self.conf.realms.get(realm, {}).get("kdc", []) if self.conf else [])

    def _principal(self) -> None:
        s = self.settings
        if s is None:
            self.add("identity", "skip", "needs a valid configuration")
            return
        if s.principal:
            self.principal = s.principal
            self.add("identity", "ok", f"principal {s.principal} set in the configuration (not enforced by AWS: "
                     "whoever edits the file chooses it)", trusted=False)
            return
        if self.broker:
            state = keeper_state(s) or {}
            who = (state.get("identity") or {}).get("name")
            last = (f"; its last answer named {state['principal']}" + (f" (AWS identity {who})" if who else "")
                    if state.get("principal") else "; the keeper has not had an answer yet")
            self.add("identity", "ok", f"no principal needed: the broker says who the user is, from the notebook's "
                     f"AWS identity{last}", trusted=True)
            return
        if not (s.identity or s.mapping):
            self.add("identity", "fail", "no principal and no identity/mapping rules in the configuration",
                     "set 'principal', or 'identity' + 'mapping' (README 'Identity mapping')")
            return
        from ..core.identity import IdentityResolver
        from ..core.mapping import map_identity

        try:
            who = IdentityResolver(s.identity).resolve()
            self.principal = map_identity(who.name, s.mapping)
        except KerbJupyterError as err:
            self.add("identity", "fail", str(err), "check the execution role's permissions (ListTags, "
                     "DescribeSpace, DescribeUserProfile) and the mapping rules")
            return
        enforced = "enforced by AWS" if who.trusted else "claimed, not enforced by AWS"
        self.add("identity", "ok", f"{who.name} from {who.source} ({enforced}), mapped to {self.principal}",
                 trusted=who.trusted)

    def _kdcs(self) -> None:
        realm = self._wanted_realm()
        entries = self._kdc_entries(realm) if realm else []
        if not entries:
            srv = self.conf is not None and self.conf.flag("dns_lookup_kdc", False)
            self.add("dns", "skip", f"KDCs come from DNS SRV records (_kerberos._tcp.{realm}), not checked here"
                     if srv else "no KDC listed in krb5.conf for the realm: nothing to resolve")
            return
        resolved, unresolved = [], []
        for entry in entries:
            host, port = split_host_port(entry, 88)
            try:
                addrs = sorted({a[4][0] for a in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})
                resolved.append((host, port, addrs))
            except OSError as err:
                unresolved.append(f"{host} does not resolve ({getattr(err, 'strerror', None) or err})")
        self.add("dns", "fail" if unresolved else "ok",
                 "; ".join([*(f"{h} -> {', '.join(map(str, a))}" for h, _, a in resolved), *unresolved]),
                 "the VPC's DNS must resolve the directory's names (DHCP options or a Route 53 resolver rule "
                 "forwarding the AD domain to the domain controllers; DNS on port 53)")
        reached, problems, skews = [], [], []
        for host, port, _ in resolved:
            for transport in ("tcp", "udp"):
                try:
                    answer = probe_kdc(host, port, realm or "", transport, self.timeout)
                except (OSError, ValueError) as err:
                    problems.append(f"{host}:{port}/{transport}: {_os_reason(err)}")
                    continue
                reached.append(f"{host}:{port}/{transport} ({KRB_ERROR_NAMES.get(answer.error_code or 0, 'answered')})")
                if answer.kdc_time is not None:
                    skews.append(self.clock() - answer.kdc_time)
        status = "ok" if reached and not problems else ("warn" if reached or self.broker else "fail")
        detail = "; ".join([*(f"reached {r}" for r in reached), *problems]) or "no KDC host resolved"
        if self.broker and status != "ok":
            detail += " (with the broker source only the broker needs the KDC: the notebook uses service tickets)"
        self.add("kdc", status, detail, "" if status == "ok" else "the notebook's subnet and security groups must "
                 "reach the domain controllers on TCP and UDP 88 and 464 (and DNS on 53); check the kdc lines")
        self._kpasswd(realm or "", entries)
        self._clock(skews)

    def _kpasswd(self, realm: str, entries: list[str]) -> None:
        conf = self.conf.realms.get(realm, {}) if self.conf else {}
        targets = conf.get("kpasswd_server") or conf.get("admin_server") or entries
        results = []
        for entry in targets:
            host, port = split_host_port(entry, 464) if entry not in entries else (split_host_port(entry, 88)[0], 464)
            try:
                tcp_open(host, port, self.timeout)
                results.append(f"{host}:{port}/tcp open")
            except OSError as err:
                results.append(f"{host}:{port}/tcp {_os_reason(err)}")
        ok = all(r.endswith("open") for r in results)
        self.add("kpasswd", "ok" if ok else "warn", "; ".join(results) + " (UDP 464 is not probed)",
                 "" if ok else "password changes (kpasswd, port 464) will fail; tickets from a keytab do not need it")

    def _clock(self, skews: list[float]) -> None:
        if not skews:
            self.add("clock", "skip", "no KDC answered: the clock could not be compared")
            return
        skew = min(skews, key=abs)
        limit = _seconds(self.conf.libdefaults.get("clockskew", "300") if self.conf else "300")
        detail = f"this machine is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} the KDC (allowed {limit} s)"
        fix = "synchronise the clock (chrony/NTP; on AWS the Time Sync Service at 169.254.169.123)"
        self.add("clock", "fail" if abs(skew) > limit else ("warn" if abs(skew) > 60 else "ok"), detail, fix,
                 skew=round(skew, 3))

    def _source(self) -> None:
        s = self.settings
        if s is None or not s.source:
            self.add("source", "skip" if s is None else "warn", "no credential source configured: the keeper can "
                     "only use a ticket someone put in the cache", "set 'source' (keytab or Secrets Manager)")
            return
        kind = s.source.get("type", "keytab" if s.source.get("keytab") else "?")
        if kind == "keytab":
            path = Path(str(s.source.get("keytab", ""))).expanduser()
            if not os.access(path, os.R_OK) or not path.is_file():
                self.add("source", "fail", f"the keytab {path} is missing or unreadable by uid {os.geteuid()}",
                         "copy the user's keytab there (mode 0600, owned by the notebook user)")
            else:
                self.add("source", "ok", f"keytab {path} is readable ({path.stat().st_size} bytes)")
        elif kind == "broker":
            self.checks.append(broker_check(s.source, self.timeout))
        elif kind.startswith("secretsmanager"):
            self.add("source", "ok", f"{kind} {s.source.get('secret_id')} (not fetched by the doctor; the keeper's "
                     "last report is below)")
        else:
            self.add("source", "ok", f"{kind} {s.source.get('cache', '')}".strip())

    def _ticket(self) -> None:
        s = self.settings
        if s is None:
            self.add("ticket", "skip", "needs a valid configuration")
            return
        try:
            path = cache_path(s)
            info = tickets.read_cache(path, allow_expired=True)
        except KerbJupyterError as err:
            self.add("ticket", "fail", str(err), "start the Jupyter server with the extension (it fetches the "
                     "ticket); see the keeper check below")
            return
        now = self.clock()
        if self.principal and info.principal != self.principal:
            self.add("ticket", "fail", f"the shared cache {path} holds a ticket for {info.principal}, not for "
                     f"{self.principal}: another tool (kinit, %sm_analytics) wrote into it",
                     "run other tools with their own KRB5CCNAME; the keeper restores its own ticket at its next "
                     "step, or POST kerb-jupyter/api/renew", foreign=info.principal)
            return
        if info.expired(now):
            self.add("ticket", "fail", f"the ticket for {info.principal} in {path} expired "
                     f"{now - info.endtime:.0f} s ago", "the keeper should have renewed it: see its last error "
                     "below; `kerb-jupyter status` shows the cache")
            return
        self.ticket = info
        if self.broker:
            self.add("ticket", "ok", f"{info.principal}: service tickets from the broker for "
                     f"{', '.join(spn for spn, _ in info.services) or 'no cluster'}, valid for "
                     f"{(info.endtime - now) / 60:.0f} min, not renewable (by design: the keeper asks the broker "
                     "again before they expire)", principal=info.principal, endtime=info.endtime,
                     services=[spn for spn, _ in info.services])
            return
        renew = (f"renewable for {(info.renew_till - now) / 3600:.1f} h" if info.renewable
                 else "NOT renewable")
        status = "ok" if info.renewable else "warn"
        self.add("ticket", status, f"{info.principal}: valid for {(info.endtime - now) / 60:.0f} min, {renew}",
                 "ask for renewable tickets (renew_lifetime in krb5.conf; the account's max renewable life)",
                 principal=info.principal, endtime=info.endtime)

    def _keeper(self) -> None:
        state = keeper_state(self.settings) if self.settings else None
        if not state:
            self.add("keeper", "warn", "no keeper state file: the server extension has not run with this "
                     "configuration", "restart the Jupyter server after installing (the lifecycle script does)")
            return
        err = state.get("last_error") or {}
        bad = state.get("state") in ("error", "expired", "retrying")
        detail = f"state {state.get('state')!r}" + (f", last error: {err.get('message')}" if err else "")
        refused = parse_refused(state.get("refused"))
        if refused:
            detail += f"; the broker refused {describe_refused(refused)}"
        fix = ("fix the error above, then POST api/renew or restart" if bad else
               "the broker's administrator fixes each reason named; the keeper asks the broker again by itself")
        self.add("keeper", "fail" if bad else ("warn" if refused else "ok"), detail, fix, state=state.get("state"))

    def _install_record(self) -> None:
        s = self.settings
        path = (s.path.parent if s and s.path else Path.home() / ".jupyter") / INSTALL_RECORD
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return  # not installed by a lifecycle script
        status = {"ok": "ok", "running": "warn"}.get(str(record.get("status")), "fail")
        self.add("install", status, f"{record.get('platform', '?')} lifecycle install: {record.get('status')} "
                 f"at {record.get('at', '?')}: {record.get('message', '')}",
                 f"see the install log {record.get('log', '')}", record={k: str(v) for k, v in record.items()})


def _seconds(text: str) -> int:
    text = text.strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], 1)
    digits = text.rstrip("smh")
    return int(digits) * mult if digits.isdigit() else 300


def _os_reason(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (nothing listens)"
    if isinstance(err, TimeoutError | socket.timeout):
        return "no answer (timeout: a firewall or security group drops it)"
    if isinstance(err, socket.gaierror):
        return f"name does not resolve ({err.strerror})"
    return str(err) or type(err).__name__


def run_doctor(clusters: Sequence[str] = (), config_path: str | Path | None = None, **kwargs: Any) -> Report:
    """Run every check; never raises for a failed check (it is in the report)."""
    return Doctor(config_path, **kwargs).run(clusters)
