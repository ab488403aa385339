"""The LDAP-backed sandbox realm: slapd + MIT KDC doing S4U2Self/S4U2Proxy, and the broker's issuing on top of it
into a real PostgreSQL (the issuing's own cases are in test_broker_issue.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import krb5
import psycopg
import pytest

from kerb_jupyter import SandboxError
from kerb_jupyter.broker.issue import Issuer
from kerb_jupyter.sandbox import Postgres
from kerb_jupyter.sandbox.ldap import LdapRealm
from kerb_jupyter.sandbox.procs import port_is_free
from kerb_jupyter.server.brokersource import store_cache

BROKER = "HTTP/broker.localhost"
PG = "postgres/localhost"
OTHER = "postgres/finance.localhost"  # a second cluster's SPN the broker may delegate to
FORBIDDEN = "postgres/forbidden.localhost"  # exists, but is not in the broker's krbAllowedToDelegateTo


@pytest.fixture(scope="module")
def ldap_realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("ldap")
    realm = LdapRealm(root / "realm")
    server = None
    old = os.environ.get("KRB5_CONFIG")
    try:
        realm.create()
        for spn in (PG, OTHER, FORBIDDEN):
            realm.add_principal(spn)
        keytab = root / "broker.keytab"
        realm.add_delegating_service(BROKER, [PG, OTHER], keytab=keytab)
        realm.add_principal("HTTP/plain.localhost", keytab=root / "plain.keytab")  # no delegation rights
        realm.add_user("alice", groups=["analysts", "finance"])
        realm.add_user("bob", groups=["analysts"])
        realm.start()
        server = Postgres(root, realm, "ldapdb")
        server.start()
        server.create_database("ldapdb", "alice@KERB.TEST")
        server.create_database("bobdb", "bob@KERB.TEST")
        os.environ["KRB5_CONFIG"] = str(realm.krb5_conf)
        yield SimpleNamespace(realm=realm, server=server, keytab=keytab, root=root)
    finally:
        if server is not None:
            server.destroy()
        realm.stop()
        if old is None:
            os.environ.pop("KRB5_CONFIG", None)
        else:
            os.environ["KRB5_CONFIG"] = old


def _tickets(path: Path) -> tuple[str, list[krb5.Creds]]:
    ctx = krb5.init_context()
    cc = krb5.cc_resolve(ctx, f"FILE:{path}".encode())
    return cc.principal.name.decode(), list(cc)


def _connect(env_cache: Path, port: int, user: str, dbname: str) -> tuple[str, bool]:
    os.environ["KRB5CCNAME"] = f"FILE:{env_cache}"
    with psycopg.connect(host="localhost", port=port, dbname=dbname, user=user, gssencmode="require",
                         connect_timeout=10) as conn:
        row = conn.execute("SELECT principal, encrypted FROM pg_stat_gssapi WHERE pid = pg_backend_pid()").fetchone()
        assert row is not None
        return row[0], row[1]


def test_the_ldap_realm_starts_and_stops_leaving_nothing_running(tmp_path):
    realm = LdapRealm(tmp_path / "realm")
    realm.create()
    realm.add_user("carol", groups=["ops"])
    realm.start()
    kdc, ldap = realm.port, realm.slapd.port
    pids = [realm.proc.pid, realm.slapd.proc.pid]
    assert not port_is_free(kdc) and not port_is_free(ldap)
    assert realm.running and realm.backend == "ldap"
    realm.stop()
    assert not realm.running
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert port_is_free(kdc) and port_is_free(ldap)
    realm.start()  # the same directory starts again, data kept
    try:
        assert realm.groups_of("carol") == ["cn=ops,ou=Groups,dc=kerb,dc=test"]
    finally:
        realm.stop()
    assert not realm.running


def test_users_have_no_keys_and_their_groups_are_in_ldap(ldap_realm):
    realm = ldap_realm.realm
    out = subprocess.run(["kadmin.local", "-r", realm.realm, "-q", "getprinc alice"], capture_output=True, text=True,
                         env={**os.environ, **realm.env}).stdout
    assert "Number of keys: 0" in out  # (kadmin.local's "Failed password attempts" line defeats Realm.kadmin)
    assert realm.groups_of("alice") == ["cn=analysts,ou=Groups,dc=kerb,dc=test", "cn=finance,ou=Groups,dc=kerb,dc=test"]
    assert realm.groups_of("bob") == ["cn=analysts,ou=Groups,dc=kerb,dc=test"]
    members = realm.slapd.search(realm.groups, "(cn=analysts)", "member")[0]["member"]
    assert sorted(members) == [realm.user_dn("alice"), realm.user_dn("bob")]
    entry = realm.slapd.search(realm.suffix, f"(krbPrincipalName={BROKER}@KERB.TEST)", "krbAllowedToDelegateTo")
    assert sorted(entry[0]["krbAllowedToDelegateTo"]) == sorted([f"{PG}@KERB.TEST", f"{OTHER}@KERB.TEST"])
    # the read-only account sees no keys, and nobody reads anything anonymously
    assert not realm.slapd.search(realm.suffix, "(krbPrincipalKey=*)", "krbPrincipalKey")
    res = subprocess.run(["ldapsearch", "-x", "-LLL", "-H", realm.slapd.url, "-b", realm.suffix, "(uid=alice)"],
                         capture_output=True, text=True, env={**os.environ, "LDAPNOINIT": "1"})
    assert "uid=alice" not in res.stdout


def _issue(ldap_realm: SimpleNamespace, user: str, spns: list[str], path: Path, issuer: Issuer | None = None) -> Path:
    issuer = issuer or Issuer(BROKER, ldap_realm.keytab)
    store_cache(issuer.issue(user, {spn: spn for spn in spns}, 600).cache, path)
    return path


def test_the_broker_gets_alice_into_postgres_with_only_service_tickets(ldap_realm, tmp_path):
    realm = ldap_realm.realm
    assert "[domain_realm]" in realm.krb5_conf.read_text()  # the mapping that breaks empty-realm tickets
    cache = _issue(ldap_realm, "alice", [PG, OTHER], tmp_path / "alice.cc")
    assert cache.stat().st_mode & 0o777 == 0o600
    default, creds = _tickets(cache)
    assert default == "alice@KERB.TEST"
    assert sorted(c.server.name.decode() for c in creds) == sorted([f"{PG}@KERB.TEST", f"{OTHER}@KERB.TEST"])
    for c in creds:
        assert c.client.name == b"alice@KERB.TEST"
        assert c.second_ticket == b""  # the evidence ticket stays in the broker
        assert c.times.endtime - c.times.starttime <= 600
    principal, encrypted = _connect(cache, ldap_realm.server.port, "alice@KERB.TEST", "ldapdb")
    assert (principal, encrypted) == ("alice@KERB.TEST", True)


def test_one_issuer_serves_several_users_each_only_their_own(ldap_realm, tmp_path):
    issuer = Issuer(BROKER, ldap_realm.keytab)
    _issue(ldap_realm, "alice", [PG], tmp_path / "alice.cc", issuer)  # the broker's own TGT is now reused
    cache = _issue(ldap_realm, "bob@KERB.TEST", [PG, OTHER], tmp_path / "bob.cc", issuer)
    assert _connect(cache, ldap_realm.server.port, "bob@KERB.TEST", "bobdb")[0] == "bob@KERB.TEST"
    with pytest.raises(psycopg.OperationalError):  # bob's tickets are bob's: no login as alice
        _connect(cache, ldap_realm.server.port, "alice@KERB.TEST", "ldapdb")


def test_a_slapd_that_fails_reports_its_log(tmp_path):
    realm = LdapRealm(tmp_path / "realm")
    realm.slapd.create()
    realm.slapd.conf.write_text(realm.slapd.conf.read_text().replace("moduleload memberof", "moduleload nonesuch"))
    with pytest.raises(SandboxError, match="slapd did not start") as err:
        realm.slapd.start()
    assert "nonesuch" in str(err.value)
    assert not realm.running


def test_the_cache_also_works_for_a_client_without_domain_realm(ldap_realm, tmp_path):
    """Clients without the mapping ask for postgres/localhost@ (the referral realm); the full name still matches."""
    text = ldap_realm.realm.krb5_conf.read_text()
    conf = tmp_path / "krb5.conf"
    conf.write_text(text.split("[domain_realm]")[0])
    cache = _issue(ldap_realm, "alice", [PG], tmp_path / "alice.cc")
    os.environ["KRB5_CONFIG"] = str(conf)
    assert _connect(cache, ldap_realm.server.port, "alice@KERB.TEST", "ldapdb")[0] == "alice@KERB.TEST"
