"""The ticket keeper against the real KDC with lifetimes of seconds, and real GSSAPI logins to PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import psycopg
import pytest
from helpers import keeper_for
from moto import mock_aws

from kerb_jupyter.core import tickets
from kerb_jupyter.server.keeper import TicketKeeper
from kerb_jupyter.server.sources import ExistingCacheSource, KeytabSource, SecretsManagerSource


def connect(sandbox, cluster: str = "analytics") -> psycopg.Connection:
    return psycopg.connect(host="localhost", port=sandbox.servers[cluster].port, dbname=cluster,
                           user=sandbox.principal, gssencmode="disable", require_auth="gss", connect_timeout=5)


def as_requests(sandbox, principal: str) -> int:
    """How many AS requests the KDC has logged for ``principal`` (its own log, not ours)."""
    log = sandbox.realm.log_file.read_text(errors="replace")
    return sum(1 for line in log.splitlines() if "AS_REQ" in line and f" {principal} for krbtgt" in line)


async def until_valid(keeper: TicketKeeper) -> None:
    for _ in range(100):
        if keeper.state.state == "valid":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the keeper never got a ticket: {keeper.state}")


async def hammer(sandbox, seconds: float, every: float = 0.2) -> tuple[int, list[str]]:
    """Open a new GSSAPI connection every ``every`` seconds; return (successes, failures)."""
    ok, failed = 0, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await asyncio.to_thread(lambda: connect(sandbox).close())
            ok += 1
        except psycopg.OperationalError as err:
            failed.append(str(err).strip().splitlines()[-1])
        await asyncio.sleep(every)
    return ok, failed


def hammer_while_keeping(sandbox, cache, seconds: float, every: float, **keeper_args):
    """Run a keeper and open new GSSAPI connections meanwhile; returns (keeper, successes, failures)."""
    async def scenario():
        keeper = keeper_for(sandbox, cache, **keeper_args)
        keeper.start()
        await until_valid(keeper)
        try:
            return keeper, *await hammer(sandbox, seconds, every)
        finally:
            await keeper.stop()

    return asyncio.run(scenario())


def test_connections_keep_working_over_three_lifetimes(sandbox, cache):
    keeper, ok, failed = hammer_while_keeping(sandbox, cache, 10, 0.2, lifetime=3, renew_life=3600)
    assert failed == [] and ok > 20
    assert keeper.state.renewals >= 3, keeper.state
    assert keeper.state.last_renewal_kind == "renewed"
    info = tickets.read_cache(cache)
    assert info.endtime - info.starttime <= 3


def test_kdc_outage_is_reported_paced_and_recovered(sandbox, cache):
    async def scenario():
        keeper = keeper_for(sandbox, cache, lifetime=4, renew_life=3600)
        keeper.start()
        await until_valid(keeper)
        held = await asyncio.to_thread(connect, sandbox)
        sandbox.realm.stop()
        try:
            await asyncio.sleep(6)  # past expiry while the KDC is down
            states = keeper.state.state, keeper.state.last_error, keeper.state.consecutive_failures
            # An open, authenticated connection outlives its ticket.
            still = await asyncio.to_thread(lambda: held.execute("SELECT 1").fetchone())
        finally:
            sandbox.realm.start()
        for _ in range(100):
            if keeper.state.state == "valid":
                break
            await asyncio.sleep(0.1)
        recovered = keeper.state.state
        fresh = await asyncio.to_thread(lambda: connect(sandbox).execute("SELECT current_user").fetchone())
        held.close()
        await keeper.stop()
        return states, still, fresh, recovered

    (state, error, failures), still, fresh, recovered = asyncio.run(scenario())
    assert state in ("retrying", "expired")
    assert error["code"] == "kdc_unreachable" and "cannot reach the KDC" in error["message"]
    # Backoff 0.3 s doubling to 0.6 s, capped by the time left: a handful of tries in ~5 s, never a storm.
    assert 3 <= failures <= 25, failures
    assert still == (1,)
    assert recovered == "valid" and fresh == (sandbox.principal,)


@pytest.fixture(scope="module")
def extra_principals(sandbox, tmp_path_factory):
    d = tmp_path_factory.mktemp("principals")
    names = {}
    for who in ("bob", "carol", "dave"):
        password = secrets.token_urlsafe(12)
        names[who] = (sandbox.realm.add_principal(f"{who}{secrets.token_hex(3)}", password=password,
                                                  keytab=d / f"{who}.keytab"), password, d / f"{who}.keytab")
    sandbox.realm.modify_principal(names["carol"][0], "-allow_tix")
    return names


@pytest.fixture
def aws(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield boto3.client("secretsmanager", region_name="us-east-1")


@pytest.mark.parametrize("case", ["wrong_password", "disabled", "keytab_for_someone_else"])
def test_rejected_credentials_stop_without_a_retry_storm(sandbox, cache, extra_principals, aws, case, caplog):
    bob, carol, dave = extra_principals["bob"], extra_principals["carol"], extra_principals["dave"]
    if case == "wrong_password":
        principal = bob[0]
        aws.create_secret(Name=f"kerberos/{principal.split('@')[0]}", SecretString="not-the-password")
        source = SecretsManagerSource("kerberos/{user}", "password", region="us-east-1")
    elif case == "disabled":
        principal, source = carol[0], KeytabSource(carol[2])
    else:
        principal, source = dave[0], KeytabSource(sandbox.keytab)  # alice's keytab
    before = as_requests(sandbox, principal)

    async def scenario():
        keeper = keeper_for(sandbox, cache, source, principal, retry_interval=0.1, max_retry_interval=0.1)
        keeper.start()
        await asyncio.sleep(2.0)
        await keeper.stop()
        return keeper

    with caplog.at_level(logging.DEBUG):
        keeper = asyncio.run(scenario())
    s = keeper.state
    assert s.state == "error" and s.next_attempt is None
    assert s.last_error["code"] == "credentials_rejected"
    assert principal in s.last_error["message"]
    assert s.consecutive_failures == 1
    assert as_requests(sandbox, principal) - before <= 2  # one attempt (the KDC may log a preauth round)
    assert "not-the-password" not in caplog.text and "not-the-password" not in str(s.as_dict())


def test_renew_until_reached_reacquires_without_a_gap(sandbox, cache):
    keeper, ok, failed = hammer_while_keeping(sandbox, cache, 12, 0.1, lifetime=2, renew_life=5)
    assert failed == [] and ok > 40
    assert keeper.state.acquisitions >= 2 and keeper.state.renewals >= 1, keeper.state


def test_fifty_concurrent_connections_during_back_to_back_renewals(sandbox, cache):
    keeper = keeper_for(sandbox, cache)
    keeper.step()
    stop = threading.Event()
    renewals = 0

    def renew_loop():
        nonlocal renewals
        while not stop.is_set():
            keeper.step(force=True)
            renewals += 1

    def attempt(_):
        try:
            connect(sandbox).close()
            return None
        except psycopg.OperationalError as err:
            return str(err).strip().splitlines()[-1]

    renewer = threading.Thread(target=renew_loop)
    renewer.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(attempt, range(50)))
    finally:
        stop.set()
        renewer.join()
    assert [r for r in results if r] == []
    assert renewals >= 5 and keeper.state.state == "valid"


def test_existing_kinit_cache_is_adopted_then_renewed(sandbox, cache, tmp_path):
    kinit_cache = tmp_path / "kinit" / "krb5cc_user"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, kinit_cache, lifetime=60)
    keeper = keeper_for(sandbox, cache, ExistingCacheSource(kinit_cache))
    keeper.step()
    assert keeper.state.state == "valid" and keeper.state.last_renewal_kind == "acquired"
    keeper.step(force=True)
    assert keeper.state.renewals == 1
    assert tickets.read_cache(cache).principal == sandbox.principal


@pytest.mark.parametrize("form", ["binary", "base64"])
def test_keytab_from_secrets_manager(sandbox, cache, aws, form, caplog):
    raw = sandbox.keytab.read_bytes()
    if form == "binary":
        aws.create_secret(Name="kerberos/alice", SecretBinary=raw)
    else:
        aws.create_secret(Name="kerberos/alice", SecretString=base64.b64encode(raw).decode())
    keeper = keeper_for(sandbox, cache, SecretsManagerSource("kerberos/{user}", "keytab", region="us-east-1"))
    with caplog.at_level(logging.DEBUG):
        keeper.step()
    assert keeper.state.state == "valid", keeper.state.last_error
    assert [p.name for p in cache.parent.iterdir() if "keytab" in p.name] == []  # the temporary keytab is gone
    assert base64.b64encode(raw).decode()[:20] not in caplog.text


def test_missing_secret_is_a_clear_error(sandbox, cache, aws):
    keeper = keeper_for(sandbox, cache, SecretsManagerSource("kerberos/{user}", "keytab", region="us-east-1"))
    keeper.step()
    assert keeper.state.state in ("expired", "retrying")
    assert keeper.state.last_error["message"] == \
        "Secrets Manager refused secret 'kerberos/alice': ResourceNotFoundException"


def test_password_from_secrets_manager_never_reaches_logs_or_state(sandbox, cache, aws, extra_principals, caplog):
    principal, password, _ = extra_principals["bob"]
    aws.create_secret(Name=f"ad/{principal}", SecretString=password)
    keeper = keeper_for(sandbox, cache, SecretsManagerSource("ad/{principal}", "password", region="us-east-1"),
                        principal)
    with caplog.at_level(logging.DEBUG):
        keeper.step()
    assert keeper.state.state == "valid"
    assert password not in caplog.text
    assert password not in (cache.parent / "state.json").read_text()


def test_clock_skew_against_the_kdc_is_reported(sandbox, cache, caplog):
    # The injected clock is this machine's clock running 2 minutes fast; the KDC stamps real time.
    keeper = keeper_for(sandbox, cache, clock=lambda: time.time() + 120)
    with caplog.at_level(logging.WARNING, logger="kerb_jupyter.server.keeper"):
        keeper.step()
    assert keeper.state.state == "valid"
    assert -125 < keeper.state.clock_skew < -115
    assert "clock differs from the KDC's by -12" in caplog.text


def test_a_foreign_ticket_in_the_shared_cache_is_replaced_with_a_warning(sandbox, cache, extra_principals, caplog):
    keeper = keeper_for(sandbox, cache)
    keeper.step()
    bob, _, bob_keytab = extra_principals["bob"]
    tickets.acquire_with_keytab(bob, bob_keytab, cache)  # someone ran kinit into the shared cache
    with caplog.at_level(logging.WARNING, logger="kerb_jupyter.server.keeper"):
        keeper.step()
    assert tickets.read_cache(cache).principal == sandbox.principal
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"held a ticket for {bob}, not for {sandbox.principal}" in warning.getMessage()
    assert "kinit" in warning.getMessage()


def test_status_names_the_secret_actually_used(sandbox, cache, aws):
    aws.create_secret(Name="kerberos/alice", SecretBinary=sandbox.keytab.read_bytes())
    keeper = keeper_for(sandbox, cache, SecretsManagerSource("kerberos/{user}", "keytab", region="us-east-1"))
    assert keeper.state.source == "Secrets Manager keytab kerberos/alice"
    keeper.step()
    assert keeper.state.state == "valid" and "{user}" not in json.dumps(keeper.state.as_dict())


def test_a_new_secret_version_lifts_the_hold_after_rejection(sandbox, cache, aws, extra_principals):
    principal, password, _ = extra_principals["bob"]
    aws.create_secret(Name=f"ad/{principal}", SecretString="not-the-password")
    keeper = keeper_for(sandbox, cache, SecretsManagerSource("ad/{principal}", "password", region="us-east-1"),
                        principal, rejected_cooldown=900)
    keeper.step()
    assert keeper.state.last_error["code"] == "credentials_rejected"
    assert 899 < keeper.renewal_hold() <= 900  # the same secret: no new attempt for 15 minutes
    aws.put_secret_value(SecretId=f"ad/{principal}", SecretString=password)  # the user fixes the secret
    assert keeper.renewal_hold() == 0
    keeper.step(force=True)
    assert keeper.state.state == "valid" and keeper.renewal_hold() == 0
