"""The extension inside a real Jupyter server (pytest-jupyter) against the real KDC and PostgreSQL."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from helpers import start_extensions, wait_state
from tornado.httpclient import HTTPClientError

from kerb_jupyter import tickets


async def test_extension_loads_and_gets_a_ticket(jp_serverapp, jp_fetch, sandbox, kj_config):
    assert "kerb_jupyter" in jp_serverapp.extension_manager.extensions
    await start_extensions(jp_serverapp)
    doc = await wait_state(jp_fetch, "valid")
    assert doc["principal"] == sandbox.principal
    assert doc["expires_at"] > doc["server_time"]
    assert doc["renew_until"] >= doc["expires_at"]
    # The shared cache: private directory, private file, a real TGT for the principal.
    cache = Path(os.environ["KRB5CCNAME"].removeprefix("FILE:"))
    assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert tickets.read_cache(cache).principal == sandbox.principal
    assert "keytab" in doc["source"]


async def test_status_requires_authentication(jp_serverapp, jp_fetch):
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("kerb-jupyter", "api", "status", headers={"Authorization": ""})
    assert err.value.code in (401, 403)
    with pytest.raises(HTTPClientError) as err:
        await jp_fetch("kerb-jupyter", "api", "status", headers={"Authorization": "token wrong"})
    assert err.value.code in (401, 403)


async def test_status_never_contains_secret_material(jp_serverapp, jp_fetch, sandbox):
    await start_extensions(jp_serverapp)
    doc = await wait_state(jp_fetch, "valid")
    body = json.dumps(doc)
    assert sandbox.password_file.read_text() not in body
    keytab = sandbox.keytab.read_bytes()
    assert keytab.hex()[:32] not in body


@pytest.fixture
def identity_config(request, kj_config, sandbox):
    from conftest import write_config

    user, rule = request.param
    return write_config(kj_config, sandbox, principal=None, identity={"order": ["config"], "user": user},
                        mapping={"rules": [rule]})


@pytest.mark.parametrize("identity_config", [("Alice@Example.com", {"template": "{local}@kerb.test", "case": "lower"})],
                         indirect=True)
async def test_identity_is_mapped_to_the_principal(identity_config, jp_serverapp, jp_fetch, sandbox):
    await start_extensions(jp_serverapp)
    doc = await wait_state(jp_fetch, "valid")
    assert doc["principal"] == sandbox.principal == "alice@KERB.TEST"
    assert doc["identity"]["name"] == "Alice@Example.com"
    assert doc["identity"]["source"] == "config" and doc["identity"]["trusted"] is False


@pytest.mark.parametrize("identity_config", [("mallory@evil.com", {"template": "{local}@KERB.TEST",
                                                                     "domain": "example.com"})], indirect=True)
async def test_an_unmapped_identity_is_refused_not_guessed(identity_config, jp_serverapp, jp_fetch):
    await start_extensions(jp_serverapp)
    doc = await wait_state(jp_fetch, "error")
    assert doc["principal"] is None and doc["next_attempt"] is None
    assert doc["last_error"]["code"] == "unmapped_identity"
    assert "'mallory@evil.com'" in doc["last_error"]["message"]


@pytest.mark.parametrize("identity_config", [("mallory@example.com", {"template": "{local}@KERB.TEST"})],
                         indirect=True)
async def test_a_principal_the_kdc_does_not_know_is_an_error(identity_config, jp_serverapp, jp_fetch):
    await start_extensions(jp_serverapp)
    doc = await wait_state(jp_fetch, "error")
    assert doc["principal"] == "mallory@KERB.TEST"
    assert doc["last_error"]["code"] == "credentials_rejected"
    assert "no suitable keys for mallory@KERB.TEST" in doc["last_error"]["message"]


@pytest.fixture
def bad_config(kj_config, request):
    kj_config.write_text(request.param)
    return kj_config


@pytest.mark.parametrize(("bad_config", "message"), [
    ("{not json", "is not valid JSON"),
    ('{"clusters": {"a": {"host": "h", "port": "5432"}}}', "clusters.a.port must be a number"),
    ('{"principal": "alice@lower.case", "source": {"keytab": "/x"}}', "is not a Kerberos principal"),
    ('{"surprise": 1}', "unknown key(s) surprise"),
    ('{"principal": "a@B", "source": {"type": "ldap"}}', "source.type 'ldap' is not one of"),
], indirect=["bad_config"])
async def test_a_malformed_config_file_is_reported_not_fatal(bad_config, jp_serverapp, jp_fetch, message):
    await start_extensions(jp_serverapp)
    doc = json.loads((await jp_fetch("kerb-jupyter", "api", "status")).body)
    assert doc["state"] == "error" and doc["last_error"]["code"] == "config_error"
    assert message in doc["last_error"]["message"]
    assert doc["last_error"]["message"].startswith(str(bad_config))


@pytest.mark.parametrize("jp_server_config", [{
    "ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}, "reraise_server_extension_failures": True},
    "KerbJupyterApp": {"renew_fraction": 5},
}])
def test_an_invalid_setting_fails_start_up_naming_trait_and_value(jp_configurable_serverapp, jp_server_config,
                                                                  capsys, caplog):
    with pytest.raises(SystemExit):
        jp_configurable_serverapp(config=jp_server_config)
    said = caplog.text + "".join(capsys.readouterr())
    assert "KerbJupyterApp.renew_fraction must be between 0.1 and 0.95, not 5.0" in said


async def test_one_start_up_line_says_what_it_will_do_and_no_secret(caplog, jp_serverapp, sandbox):
    from helpers import extension

    # The app's logger does not propagate and traitlets resets its handlers while the server starts:
    # listen on it now and run the set-up step that writes the line once more.
    app = extension(jp_serverapp)
    app.log.addHandler(caplog.handler)
    try:
        app.initialize_settings()
    finally:
        app.log.removeHandler(caplog.handler)
    log = caplog.text
    [line] = [x for x in log.splitlines() if "kerb_jupyter 0.1.0:" in x]
    assert f"principal {sandbox.principal} (configured)" in line
    assert f"ticket from keytab {sandbox.keytab}" in line and "clusters: analytics, finance" in line
    assert sandbox.password_file.read_text() not in log


@pytest.mark.parametrize("jp_server_config", [{"ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}}}])
async def test_installed_but_unconfigured_changes_nothing(monkeypatch, jp_server_config, jp_configurable_serverapp,
                                                          tmp_path):
    monkeypatch.setenv("KRB5CCNAME", "FILE:/tmp/krb5cc_someone_elses")
    monkeypatch.delenv("KERB_JUPYTER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.jupyter/kerb_jupyter.json either
    app = jp_configurable_serverapp(config=jp_server_config)
    from helpers import extension

    ext = extension(app)
    assert ext.keeper is None and ext.config_error is None
    assert os.environ["KRB5CCNAME"] == "FILE:/tmp/krb5cc_someone_elses"  # a user's own kinit cache is left alone
