"""Behaving as Active Directory expects: a KDC that refuses expired renewals, paced retries against a dead KDC,
root-relative notebook tags, discoverable settings, readable status (the real server process: test_server_process)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import KernelSession, start_extensions, wait_keeper

from kerb_jupyter.core import tickets
from kerb_jupyter.core.state import CredentialStatus, _clock
from kerb_jupyter.sandbox.realm import Realm
from kerb_jupyter.server.keeper import TicketKeeper
from kerb_jupyter.server.sources import KeytabSource
from kerb_jupyter.sql.origin import notebook_path


@pytest.fixture(scope="module")
def ad_realm(tmp_path_factory):
    """A realm whose KDC, like Active Directory, refuses to renew an expired ticket: its clock skew is 1 s
    (MIT otherwise accepts renewals up to its 300 s skew after expiry)."""
    root = tmp_path_factory.mktemp("adrealm")
    realm = Realm(root, realm="AD.TEST", max_life=3600)
    realm.create()
    with open(realm.kdc_conf, "a") as f:
        f.write("\n[libdefaults]\n    clockskew = 1\n")
    realm.start()
    realm.alice = realm.add_principal("alice", keytab=root / "alice.keytab")
    realm.keytab = root / "alice.keytab"
    yield realm
    realm.stop()


@pytest.fixture
def ad(ad_realm, tmp_path):
    os.environ["KRB5_CONFIG"] = str(ad_realm.krb5_conf)
    ad_realm.cache = tmp_path / "state" / "krb5cc"
    ad_realm.start()  # a test that stopped it may have failed before restarting it
    return ad_realm


def expired_renewals(realm) -> int:
    """Renewals the KDC refused as expired, from its own log."""
    return sum(1 for line in realm.log_file.read_text(errors="replace").splitlines()
               if "TGS_REQ" in line and "Ticket expired" in line)


def test_this_kdc_refuses_to_renew_an_expired_ticket(ad):
    info = tickets.acquire_with_keytab(ad.alice, ad.keytab, ad.cache, lifetime=2)
    time.sleep(max(info.endtime + 2.5 - time.time(), 0))
    with pytest.raises(tickets.TicketExpiredError) as err:
        tickets.renew(ad.cache)
    # The sentence a user reads carries no raw krb5 number; the number is kept for logs and the API.
    assert "-1765" not in str(err.value) and err.value.krb5_code == -1765328352


def test_after_an_outage_an_expired_ticket_is_reacquired_at_once(ad, caplog):
    async def scenario():
        keeper = TicketKeeper(ad.alice, KeytabSource(ad.keytab), ad.cache, ad.cache.parent / "state.json",
                              lifetime=3, retry_interval=0.3, max_retry_interval=0.6)
        keeper.start()
        await wait_for_state(keeper, "valid")
        ad.stop()
        try:
            await wait_for_state(keeper, "expired")
            while time.time() < (keeper.state.expires_at or 0) + 2:  # past the KDC's 1 s skew
                await asyncio.sleep(0.1)
        finally:
            refused_before = expired_renewals(ad)
            ad.start()
        back = time.monotonic()
        acquisitions = keeper.state.acquisitions
        while keeper.state.acquisitions == acquisitions or keeper.state.state != "valid":
            await asyncio.sleep(0.02)
        recovery = time.monotonic() - back
        await keeper.stop()
        return keeper, recovery, expired_renewals(ad) - refused_before

    with caplog.at_level(logging.INFO, logger="kerb_jupyter.server.keeper"):
        keeper, recovery, refused = asyncio.run(scenario())
    print(f"recovered {recovery:.2f} s after the KDC came back (retry_interval 0.3 s, max 0.6 s)")
    assert refused == 0  # never asked to renew the expired ticket: AD would refuse it
    assert keeper.state.last_renewal_kind == "reacquired" and keeper.state.consecutive_failures == 0
    assert tickets.read_cache(ad.cache).expired() is False
    assert "reacquired a ticket for alice@AD.TEST" in caplog.text


def test_a_renewal_refused_as_expired_is_followed_by_an_acquisition(ad):
    # This machine's clock runs 30 s slow: the keeper thinks the ticket is valid, the KDC knows better.
    keeper = TicketKeeper(ad.alice, KeytabSource(ad.keytab), ad.cache, lifetime=2, clock=lambda: time.time() - 30)
    keeper.step()
    time.sleep(max(keeper.state.expires_at + 2.5 - time.time(), 0))
    refused = expired_renewals(ad)
    keeper.step(force=True)
    assert expired_renewals(ad) == refused + 1  # it did try to renew (the ticket looked valid) ...
    s = keeper.state
    assert s.state == "valid" and s.last_renewal_kind == "reacquired"  # ... and re-acquired in the same step
    assert s.failures == 0 and s.acquisitions == 2 and s.renewals == 0


def test_retry_schedule_against_a_dead_kdc(ad):
    """The attempts over a ticket's last minutes with the KDC down, on the keeper's own (injected) clock."""
    info = tickets.acquire_with_keytab(ad.alice, ad.keytab, ad.cache, lifetime=600)
    now = float(info.starttime)
    keeper = TicketKeeper(ad.alice, KeytabSource(ad.keytab), ad.cache, retry_interval=20,
                          max_retry_interval=160, clock=lambda: now)
    now += keeper.step()  # a fresh ticket: sleep until the renewal is due
    ad.stop()
    try:
        attempts, errors = [], []
        while now < info.endtime + 900:
            attempts.append(now)
            now += keeper.step()
            errors.append(dict(keeper.state.last_error or {}))
    finally:
        ad.start()
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    before = [t for t in attempts if t < info.endtime]
    print("attempts (s before expiry):", [round(info.endtime - t, 1) for t in attempts])
    assert min(gaps) >= 20  # never faster than retry_interval ...
    assert len(before) >= 3 and info.endtime - before[-1] <= 40  # ... yet several land before expiry
    assert all(g <= 160 * 1.05 for g in gaps) and gaps[-1] >= 160  # after expiry: the backoff's cap
    assert len(attempts) <= 8 + 900 // 160
    assert {e["code"] for e in errors} == {"kdc_unreachable"}
    assert all("-1765" not in e["message"] and e["krb5_code"].startswith("-1765") for e in errors)


def test_retry_delays_follow_the_documented_rule(tmp_path):
    keeper = TicketKeeper("a@B", KeytabSource(tmp_path / "k"), tmp_path / "c", retry_interval=60,
                          max_retry_interval=900, jitter=0.05)
    for failures, left, low in [(1, None, 60), (2, None, 120), (5, None, 900), (9, None, 900), (3, 7200, 240),
                                (3, 300, 100), (3, 90, 60), (1, 10, 60)]:
        delay = keeper.retry_delay(failures, left)
        assert low <= delay <= low * 1.05, (failures, left, delay)


async def wait_for_state(keeper, want: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while keeper.state.state != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"the keeper never became {want!r}: {keeper.state}")
        await asyncio.sleep(0.02)


# -- what people read ---------------------------------------------------------------------------------------
def test_status_shows_dates_that_are_not_today_in_the_users_zone(sandbox, tmp_path):
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        info = tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, tmp_path / "cc", renew_life=5 * 86400)
        text = "\n".join(CredentialStatus(str(tmp_path / "cc"), info, None, None).lines())
        assert f"renewable until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.renew_till))} JST" in text
        soon = time.time() + 1
        assert re.fullmatch(r"(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d JST", _clock(soon))
        assert _clock(soon, now=soon) == time.strftime("%H:%M:%S JST", time.localtime(soon))
        assert _clock(soon, now=soon + 2 * 86400).startswith(time.strftime("%Y-%m-%d", time.localtime(soon)))
    finally:
        os.environ.pop("TZ")
        time.tzset()


def test_status_cli_says_first_that_the_named_config_file_is_missing(tmp_path):
    env = {**os.environ, "KERB_JUPYTER_CONFIG": str(tmp_path / "nope" / "kerb_jupyter.json"), "HOME": str(tmp_path)}
    env.pop("KRB5CCNAME", None)
    env.pop("KERB_JUPYTER_STATE_DIR", None)
    out = subprocess.run([sys.executable, "-m", "kerb_jupyter.cli", "status"], env=env, capture_output=True,
                         text=True, timeout=60)
    first = out.stdout.splitlines()[0]
    assert out.returncode == 1
    assert first == (f"configuration: the kerb_jupyter configuration {tmp_path / 'nope' / 'kerb_jupyter.json'} "
                     "does not exist (named by KERB_JUPYTER_CONFIG)")


@pytest.mark.parametrize(("session_name", "root", "tag"), [
    ("/srv/nb/projects/q4 report.ipynb", "/srv/nb", "projects/q4 report.ipynb"),
    ("/srv/nb/a.ipynb", "/srv/nb/", "a.ipynb"),
    ("/home/x/secret/path/a.ipynb", "/srv/nb", "a.ipynb"),  # outside the root: the file name only
    ("/srv/nbother/a.ipynb", "/srv/nb", "a.ipynb"),
    ("/srv/nb/a.ipynb", None, "a.ipynb"),
    ("projects/a.ipynb", "/srv/nb", "projects/a.ipynb"),
    (None, "/srv/nb", None),
    ("", "/srv/nb", None),
])
def test_notebook_tag_paths(session_name, root, tag):
    assert notebook_path(session_name, root) == tag


async def test_notebook_tag_is_root_relative_in_a_real_kernel(jp_serverapp, jp_root_dir, sandbox):
    await start_extensions(jp_serverapp)
    await wait_keeper(jp_serverapp, "valid")
    (jp_root_dir / "projects" / "2026").mkdir(parents=True)
    # As JupyterLab does: path and name, so the kernel's JPY_SESSION_NAME is the server's absolute path.
    model = await jp_serverapp.session_manager.create_session(
        path="projects/2026/q4 report.ipynb", name="q4 report.ipynb", kernel_name="python3", type="notebook")
    bare = await jp_serverapp.kernel_manager.start_kernel(kernel_name="python3")  # a kernel with no notebook
    lines = {}
    try:
        for label, kid in (("notebook", model["kernel"]["id"]), ("bare", bare)):
            kernel = KernelSession(jp_serverapp.kernel_manager.get_kernel(kid).get_connection_info())
            try:
                env = kernel.run("import os; print(repr(os.environ.get('JPY_SESSION_NAME')))").stdout.strip()
                marker = f"tagged_{label}_{os.urandom(3).hex()}"
                out = await kernel.arun(f"%load_ext kerb_jupyter\n%kerbsql analytics SELECT '{marker}' AS m")
                assert out.error is None, out.text
                [lines[label]] = [x for x in sandbox.servers["analytics"].log_text().splitlines()
                                  if marker in x and "/*" in x]
                lines[label + "_env"] = env
                lines[label + "_status"] = (await kernel.arun("%kerbstatus")).text
            finally:
                kernel.close()
    finally:
        await jp_serverapp.session_manager.delete_session(model["id"])
        await jp_serverapp.kernel_manager.shutdown_kernel(bare)
    assert str(jp_root_dir) in lines["notebook_env"]  # what Jupyter hands the kernel ...
    assert "notebook='projects%2F2026%2Fq4%20report.ipynb'" in lines["notebook"]  # ... and what the database sees
    assert "pytest" not in lines["notebook"].split("/*", 1)[1]
    assert "notebook=" not in lines["bare"] and lines["bare_env"] == "None"
    # %kerbstatus in the kernel: the renewable-until moment is days away, so it carries its date and zone.
    assert re.search(r"renewable until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z+\-0-9]+\)", lines["notebook_status"])


def test_settings_are_listed_by_jupyter_help_all():
    jupyter = Path(sys.executable).parent / "jupyter"
    out = subprocess.run([str(jupyter), "kerb-jupyter", "--help-all"], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    lines = out.splitlines()
    found = {}
    for i, line in enumerate(lines):  # what `grep -A3 KerbJupyterApp` shows
        m = re.match(r"^--KerbJupyterApp\.(\w+)=", line)
        if m:
            found[m.group(1)] = " ".join(x.strip() for x in lines[i + 1:i + 4])
    for name in ("config_file", "retry_interval", "max_retry_interval", "renew_fraction", "rejected_cooldown",
                 "max_concurrent_checks", "principal", "ticket_lifetime"):
        assert name in found, name
    assert "doubles per failure" in found["retry_interval"]
    assert "Default: the environment variable KERB_JUPYTER_CONFIG" in found["config_file"]
