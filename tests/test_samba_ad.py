"""Against a real Active Directory (a Samba 4.17 AD DC): the sandbox itself, the keytab source and the keeper,
%%kerbsql into PostgreSQL whose service keytab AD exported, krb5-conf's AES-only output, refusals, doctor.

One DC per session (``ad_sandbox`` in conftest.py): the first test here pays for provisioning it (15 s idle,
~30-100 s on a busy 2-core machine), hence the module's longer per-test timeout.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from conftest import kerbsql_shell

from kerb_jupyter.cli import main
from kerb_jupyter.core import tickets
from kerb_jupyter.core.errors import CredentialsRejectedError, TicketExpiredError
from kerb_jupyter.doctor.run import run_doctor
from kerb_jupyter.sandbox.samba import PLAN
from kerb_jupyter.server.keeper import TicketKeeper
from kerb_jupyter.server.sources import KeytabSource

pytestmark = pytest.mark.timeout(300)

GSS_PROOF = "SELECT gss_authenticated, principal, encrypted FROM pg_stat_gssapi WHERE pid = pg_backend_pid()"
UF_ACCOUNTDISABLE = 0x2
UF_NOT_DELEGATED = 0x100000
UF_TRUSTED_TO_AUTH_FOR_DELEGATION = 0x1000000


@pytest.fixture
def ad(ad_sandbox, tmp_path):
    """The session's AD sandbox, with this test's Kerberos environment pointing at it."""
    os.environ["KRB5_CONFIG"] = str(ad_sandbox.ad.krb5_conf)
    os.environ["KRB5CCNAME"] = f"FILE:{tmp_path / 'unused-default-cache'}"
    return ad_sandbox


def ldap_connection(ad_sandbox, **tls_kwargs):
    """LDAPS as the broker's bind account, the certificate and host name verified against the sandbox CA."""
    import ldap3

    dc = ad_sandbox.ad
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(dc.ca_cert), **tls_kwargs)
    server = ldap3.Server(dc.address, port=636, use_ssl=True, tls=tls, connect_timeout=5)
    return ldap3.Connection(server, user=f"{PLAN.ldap_reader}@{dc.dns_domain}", password=dc.password(PLAN.ldap_reader),
                            auto_bind=True, receive_timeout=10)


# -- the sandbox itself -------------------------------------------------------------------------------------
def test_the_dc_listens_on_its_own_loopback_address_only(ad):
    dc = ad.ad
    listeners = _listeners()
    for port, proto in [(88, "tcp"), (88, "udp"), (389, "tcp"), (464, "tcp"), (636, "tcp")]:
        assert dc.address in listeners.get((proto, port), set()), (proto, port)
    wildcard = {"0.0.0.0", "::"}  # noqa: S104 - what must not appear
    for port in (53, 88, 135, 137, 138, 139, 389, 445, 464, 636, 3268, 3269):  # DNS, KDC, RPC, NetBIOS, SMB, LDAP
        for proto in ("tcp", "udp"):
            assert not listeners.get((proto, port), set()) & wildcard, f"something listens on *:{port}/{proto}"
    assert dc.address.startswith("127.") and dc.address != "127.0.0.1"
    # Every path Samba uses (pid file, sockets, state) is the sandbox's own: two DCs at once do not collide.
    effective = dc.run(["testparm", "-sv", str(dc.smb_conf)]).stdout
    settings = [tuple(x.strip() for x in line.split("=", 1)) for line in effective.splitlines() if "=" in line]
    paths = {k: v for k, v in settings if v.startswith("/") and not k.endswith("command") and not k.startswith(
        "template")}  # programs it would run (not in our services) and templates for winbind users
    assert len(paths) > 10 and all(v.startswith(str(dc.root)) for v in paths.values()), paths


def _listeners() -> dict[tuple[str, int], set[str]]:
    """(proto, port) -> local IPv4/IPv6 addresses listening (TCP) or bound (UDP), from /proc/net."""
    import ipaddress

    found: dict[tuple[str, int], set[str]] = {}
    for name, proto, state in [("tcp", "tcp", "0A"), ("tcp6", "tcp", "0A"), ("udp", "udp", "07"),
                               ("udp6", "udp", "07")]:
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != state:
                continue
            addr_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(addr_hex)
            packed = raw[::-1] if len(raw) == 4 else b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
            found.setdefault((proto, int(port_hex, 16)), set()).add(str(ipaddress.ip_address(packed)))
    return found


def test_a_second_dc_on_a_taken_address_fails_at_once_and_says_why(ad, tmp_path):
    from kerb_jupyter.core.errors import SandboxError
    from kerb_jupyter.sandbox.samba import SambaAD

    started = time.monotonic()
    with pytest.raises(SandboxError, match=f"{ad.ad.address} already has a listener"):
        SambaAD(tmp_path / "second", address=ad.ad.address).start()
    assert time.monotonic() - started < 5  # before provisioning, not after it
    assert ad.ad.running


def test_samba_tool_errors_carry_its_words_and_no_password(ad):
    from kerb_jupyter.core.errors import SandboxError

    dc = ad.ad
    with pytest.raises(SandboxError, match="samba-tool user show failed") as err:
        dc.samba_tool("user", "show", "no-such-user")
    assert "Unable to find user" in str(err.value)
    before = dc.password("bob")
    with pytest.raises(SandboxError, match="samba-tool user create failed") as err:
        dc.add_user("bob", password="Chosen-Secret-123")  # bob exists: samba-tool refuses ...
    assert "Chosen-Secret-123" not in str(err.value)  # ... the password it was given appears nowhere ...
    assert dc.password("bob") == before  # ... and bob's recorded password is still his


def test_ldaps_verifies_against_the_sandbox_ca_and_groups_nest(ad):
    dc = ad.ad
    conn = ldap_connection(ad)
    try:
        conn.search(dc.base_dn, f"(sAMAccountName={PLAN.broker})",
                    attributes=["userAccountControl", "msDS-AllowedToDelegateTo"])
        broker = conn.entries[0]
        assert int(broker.userAccountControl.value) & UF_TRUSTED_TO_AUTH_FOR_DELEGATION
        assert sorted(broker["msDS-AllowedToDelegateTo"].values) == sorted(
            dc.spn(c).split("@")[0] for c in PLAN.delegated)
        flags = {}
        for user in PLAN.users:
            conn.search(dc.base_dn, f"(sAMAccountName={user.name})",
                        attributes=["userAccountControl", "userPrincipalName", "mail"])
            entry = conn.entries[0]
            flags[user.name] = int(entry.userAccountControl.value)
            assert entry.userPrincipalName.value == dc.upn(user.name)
            assert entry.mail.value == PLAN.email(user.name)
        assert flags["sensitive"] & UF_NOT_DELEGATED and not flags["alice"] & UF_NOT_DELEGATED
        assert flags["disabled"] & UF_ACCOUNTDISABLE and not flags["alice"] & UF_ACCOUNTDISABLE
        assert dc.upn("carol") == "carol.smith@corp.example.com" and PLAN.email("carol") == "carol.smith@example.com"
        # alice is in DataSci only; DataSci is in Analysts, Analysts in AllStaff: memberOf says DataSci, the
        # in-chain rule says all three.
        conn.search(dc.base_dn, "(sAMAccountName=alice)", attributes=["memberOf"])
        assert [g.lower() for g in conn.entries[0].memberOf.values] == [dc.group_dn("DataSci").lower()]
        conn.search(dc.base_dn, f"(member:1.2.840.113556.1.4.1941:={dc.user_dn('alice')})", attributes=["cn"])
        assert sorted(e.cn.value for e in conn.entries) == ["AllStaff", "Analysts", "DataSci"]
    finally:
        conn.unbind()


def test_ldaps_with_the_wrong_ca_is_refused(ad, tmp_path):
    import ldap3

    other = tmp_path / "other-ca.pem"
    other.write_bytes(Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt").read_bytes())
    dc = ad.ad
    server = ldap3.Server(dc.address, port=636, use_ssl=True, connect_timeout=5,
                          tls=ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(other)))
    conn = ldap3.Connection(server, user=f"{PLAN.ldap_reader}@{dc.dns_domain}", password="not-the-password")
    with pytest.raises(ldap3.core.exceptions.LDAPSocketOpenError, match="CERTIFICATE_VERIFY_FAILED"):
        conn.open()


def test_the_broker_account_delegates_as_planned(ad, tmp_path):
    """S4U2Self + S4U2Proxy with MIT's kvno from the broker's keytab: the plan's delegation, as the KDC enforces it."""
    dc = ad.ad
    env = {"KRB5CCNAME": f"FILE:{tmp_path / 'broker-cc'}"}
    assert dc.run(["kinit", "-k", "-t", str(dc.keytab(PLAN.broker)), PLAN.broker], env=env).returncode == 0

    def s4u(user: str, cluster: str) -> str:
        out = dc.run(["kvno", "-U", user, "-P", dc.spn(cluster)], env=env)
        return "ok" if out.returncode == 0 else out.stderr.strip()

    for cluster in PLAN.clusters:
        refused = s4u("alice", cluster)
        assert (refused == "ok") == (cluster in PLAN.delegated), (cluster, refused)
        assert refused == "ok" or "constrained delegation failed" in refused
    assert "constrained delegation failed" in s4u("sensitive", PLAN.delegated[0])  # NOT_DELEGATED
    assert "KDC policy rejects request" in s4u("disabled", PLAN.delegated[0])  # Samba: a policy error, not REVOKED
    # Samba 4.17 finds carol for S4U2Self by her UPN only; her sAMAccountName form is "not found".
    assert s4u(dc.upn("carol"), PLAN.delegated[0]) == "ok"
    assert "not found in Kerberos database" in s4u("carol", PLAN.delegated[0])


# -- the keytab source and the keeper -------------------------------------------------------------------------
def test_the_keytab_source_gets_alices_ticket_from_ad(ad, tmp_path):
    cache = tmp_path / "state" / "krb5cc"
    info = KeytabSource(ad.keytab).acquire(ad.principal, cache, None, None)
    assert info.principal == "alice@AD.KERB.TEST" and info.renewable
    # AD's policy (smb.conf: 10 h tickets, 7 days renewable) caps what the client asks for.
    assert 10 * 3600 - 60 <= info.endtime - info.starttime <= 10 * 3600
    assert 7 * 86400 - 60 <= info.renew_till - info.starttime <= 7 * 86400
    klist = ad.ad.run(["klist", "-e", "-c", str(cache)]).stdout
    assert "krbtgt/AD.KERB.TEST@AD.KERB.TEST" in klist
    assert "Etype (skey, tkt): aes256-cts-hmac-sha1-96, aes256-cts-hmac-sha1-96" in klist


def test_renewal_from_ad_and_a_too_short_ticket_is_reacquired(ad, tmp_path):
    cache = tmp_path / "state" / "krb5cc"
    info = tickets.acquire_with_keytab(ad.principal, ad.keytab, cache, lifetime=300)
    time.sleep(1.1)
    renewed = tickets.renew(cache)
    assert renewed.starttime > info.starttime and renewed.renew_till == info.renew_till
    # Samba refuses to renew tickets of ~90 s or less as expired (KRB5KRB_AP_ERR_TKT_EXPIRED) ...
    tickets.acquire_with_keytab(ad.principal, ad.keytab, cache, lifetime=60)
    with pytest.raises(TicketExpiredError) as err:
        tickets.renew(cache)
    assert err.value.krb5_code == -1765328352
    # ... and the keeper, asked to renew such a ticket, gets a new one from the keytab in the same step.
    cache = tmp_path / "keeper" / "krb5cc"
    keeper = TicketKeeper(ad.principal, KeytabSource(ad.keytab), cache, lifetime=60)
    keeper.step()
    keeper.step(force=True)
    s = keeper.state
    assert s.state == "valid" and s.last_renewal_kind == "reacquired", s
    assert s.acquisitions == 2 and s.renewals == 0 and s.consecutive_failures == 0
    # With a renewable length of ticket the keeper renews instead.
    keeper = TicketKeeper(ad.principal, KeytabSource(ad.keytab), tmp_path / "renewing" / "krb5cc", lifetime=300)
    keeper.step()
    time.sleep(1.1)
    keeper.step(force=True)
    assert keeper.state.last_renewal_kind == "renewed" and keeper.state.renewals == 1, keeper.state


@pytest.mark.parametrize("how", ["keytab", "password"])
def test_a_disabled_account_is_a_rejection_not_an_outage(ad, tmp_path, how, caplog):
    dc, name = ad.ad, "disabled"
    principal = dc.principal(name)
    cache = tmp_path / "state" / "krb5cc"
    with pytest.raises(CredentialsRejectedError) as err:
        if how == "keytab":
            tickets.acquire_with_keytab(principal, dc.keytab(name), cache)
        else:
            tickets.acquire_with_password(principal, dc.password(name).encode(), cache)
    assert err.value.code == "credentials_rejected"
    assert err.value.krb5_code == -1765328366  # KDC_ERR_CLIENT_REVOKED, as Windows AD says it too
    assert "disabled@AD.KERB.TEST" in str(err.value) and "enabled" in str(err.value)
    assert dc.password(name) not in str(err.value)
    keeper = TicketKeeper(principal, KeytabSource(dc.keytab(name)), cache)
    assert keeper.step() == float("inf")  # not retried on a timer: only a change of source or a manual renewal
    assert keeper.state.state == "error" and keeper.state.last_error["code"] == "credentials_rejected"
    assert dc.password(name) not in caplog.text


# -- PostgreSQL whose service keytab came from AD ---------------------------------------------------------------
def test_kerbsql_logs_into_postgres_with_an_ad_exported_service_keytab(ad, tmp_path, monkeypatch):
    cache = tmp_path / "state" / "krb5cc"
    tickets.acquire_with_keytab(ad.principal, ad.keytab, cache)
    server = ad.servers["analytics"]
    keytab = ad.ad.run(["klist", "-ke", str(ad.ad.keytab(ad.ad.spn("analytics").split("@")[0]))]).stdout
    assert f"{ad.ad.spn('analytics')} (DEPRECATED:arcfour-hmac)" in keytab  # what exportkeytab gives a service
    config = ad.write_config(state_dir=str(tmp_path / "state"))
    with kerbsql_shell(monkeypatch, cache, config) as sh:
        res = sh.run_cell(f"%%kerbsql analytics\n{GSS_PROOF}")
        assert res.success, res.error_in_exec
        assert res.result.rows == [(True, "alice@AD.KERB.TEST", True)]
        res = sh.run_cell("%kerbsql finance SELECT count(*) AS n FROM trips")
        assert res.success, res.error_in_exec
        assert res.result.rows == [(1000,)]
    assert "principal=alice@AD.KERB.TEST" in server.log_text()


def test_the_krb5_conf_command_output_works_against_the_dc(ad, tmp_path, capsys):
    dc = ad.ad
    assert main(["krb5-conf", "--realm", dc.realm, "--kdc", dc.address, "--domain", dc.dns_domain]) == 0
    conf = tmp_path / "krb5.conf"
    conf.write_text(capsys.readouterr().out)
    assert "permitted_enctypes = aes256-cts-hmac-sha1-96 aes128-cts-hmac-sha1-96" in conf.read_text()
    os.environ["KRB5_CONFIG"] = str(conf)
    cache = tmp_path / "krb5cc"
    tickets.acquire_with_keytab(ad.principal, ad.keytab, cache)
    os.environ["KRB5CCNAME"] = f"FILE:{cache}"
    server = ad.servers["orders"]
    with psycopg.connect(host=server.address, port=server.port, dbname="orders", user=ad.principal,
                         gssencmode="require", connect_timeout=10) as conn:
        assert conn.execute(GSS_PROOF).fetchone() == (True, "alice@AD.KERB.TEST", True)
    # The service's key is RC4 (all exportkeytab wrote) yet an AES-only client works: it only uses the session key.
    klist = dc.run(["klist", "-e", "-c", str(cache)], env={"KRB5_CONFIG": str(conf)}).stdout
    service = klist[klist.index(f"postgres/{server.address}"):]
    assert "Etype (skey, tkt): aes256-cts-hmac-sha1-96, DEPRECATED:arcfour-hmac" in service


# -- doctor ---------------------------------------------------------------------------------------------------
def test_doctor_is_green_for_the_keytab_set_up_against_ad(ad, tmp_path, capsys):
    config = ad.write_config(state_dir=str(tmp_path / "state"))
    os.environ["KERB_JUPYTER_CONFIG"] = str(config)
    os.environ.pop("KRB5CCNAME", None)
    tickets.acquire_with_keytab(ad.principal, ad.keytab, tmp_path / "state" / "krb5cc")
    report = run_doctor((), runtime_dir=Path("/nonexistent"))
    assert report.ok, repr(report)
    statuses = {c.name: c.status for c in report.checks}
    for name in ("config", "krb5_conf", "kdc", "kpasswd", "clock", "source", "ticket"):
        assert statuses[name] == "ok", repr(report)
    for cluster in PLAN.clusters:
        assert statuses[f"{cluster}.login"] == "ok", repr(report)
        assert report.get(f"{cluster}.login").data["current_user"] == "alice@AD.KERB.TEST"
        assert report.get(f"{cluster}.service_ticket").data["spn"] == ad.ad.spn(cluster)
    out = subprocess.run([sys.executable, "-m", "kerb_jupyter.cli", "doctor", "analytics", "--timeout", "5"],
                         capture_output=True, text=True, timeout=120, env={**os.environ})
    assert out.returncode == 0, out.stdout + out.stderr
