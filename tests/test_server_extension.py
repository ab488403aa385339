"""The extension inside a real Jupyter server (pytest-jupyter) against the real KDC and PostgreSQL."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from helpers import start_extensions, wait_state
from tornado.httpclient import HTTPClientError

from kerb_jupyter.core import tickets


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


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("renew_fraction", 5, "KerbJupyterApp.renew_fraction must be between 0.1 and 0.95, not 5.0"),
    ("retry_interval", "soon", "KerbJupyterApp.retry_interval: The 'retry_interval' trait of a KerbJupyterApp "
                               "instance expected a float, not the str 'soon'"),
    ("max_retry_interval", 0, "KerbJupyterApp.max_retry_interval must be at least 0.1 s, not 0.0"),
    ("max_concurrent_checks", 0, "KerbJupyterApp.max_concurrent_checks must be from 1 to 64, not 0"),
    ("ticket_lifetime", "10h", "KerbJupyterApp.ticket_lifetime: The 'ticket_lifetime' trait"),
    ("start_keeper", "maybe", "KerbJupyterApp.start_keeper: The 'start_keeper' trait"),
    ("principal", "alice@lower.case", "KerbJupyterApp.principal: 'alice@lower.case' is not a Kerberos principal"),
    ("rejected_cooldown", [1], "KerbJupyterApp.rejected_cooldown: The 'rejected_cooldown' trait"),
    ("ticket_lifetime", -60, "KerbJupyterApp.ticket_lifetime must be 0 or more, not -60"),
    ("renewable_lifetime", -1, "KerbJupyterApp.renewable_lifetime must be 0 or more, not -1"),
])
async def test_an_invalid_setting_is_reported_and_the_extension_still_loads(
        jp_configurable_serverapp, kj_config, setting, value, message):
    config = {"ServerApp": {"jpserver_extensions": {"kerb_jupyter": True},
                            "reraise_server_extension_failures": True},
              "KerbJupyterApp": {"config_file": str(kj_config), setting: value}}
    app = jp_configurable_serverapp(config=config)
    from helpers import extension

    ext = extension(app)
    assert ext.keeper is None
    await start_extensions(app)
    from kerb_jupyter.server.handlers import status_doc

    doc = status_doc(ext)
    assert doc["state"] == "error" and doc["last_error"]["code"] == "config_error"
    assert message in doc["last_error"]["message"]


def bad(overrides, message):
    return pytest.param(overrides, message, id=message[:40])


IDENTITY = {"principal": None, "identity": {"order": ["config"], "user": "alice@example.com"},
            "mapping": {"rules": [{"template": "{local}@KERB.TEST"}]}}


def ident(identity=None, rules=None):
    return {**IDENTITY, "identity": identity or IDENTITY["identity"],
            "mapping": {"rules": rules} if rules is not None else IDENTITY["mapping"]}


BAD_VALUES = [
    bad({"principal": 42}, "principal: 42 is not a Kerberos principal"),
    bad({"source": []}, "'source' must be an object"),
    bad({"source": {"type": "ldap"}}, "source.type 'ldap' is not one of"),
    bad({"source": {"type": "keytab", "keytab": 42}}, "source.keytab must be a string, not int 42"),
    bad({"source": {"type": "keytab"}}, "source.keytab: the path of the keytab is required"),
    bad({"source": {"type": "existing_cache", "cache": ["x"]}}, "source.cache must be a string, not list"),
    bad({"source": {"type": "secretsmanager_keytab", "secret_id": 7}}, "source.secret_id must be a string"),
    bad({"source": {"type": "secretsmanager_keytab", "secret_id": "k/{usr}"}},
        "source.secret_id 'k/{usr}' uses {usr}; allowed: {principal}, {realm}, {user}"),
    bad({"source": {"type": "secretsmanager_password", "secret_id": "k/{user", "region": "x"}},
        "source.secret_id 'k/{user' is not a valid template"),
    bad({"source": {"type": "secretsmanager_password", "secret_id": "k/{user}", "region": 3}},
        "source.region must be a string, not int 3"),
    bad({"state_dir": 42}, "state_dir must be a path (a string), not int 42"),
    bad({"audit_log": ["a"]}, "audit_log must be a path (a string), not list"),
    bad({"identity": "sts"}, "'identity' must be an object"),
    bad(ident({"order": "config"}), "identity.order must be a list of resolver names"),
    bad(ident({"order": ["config", "ldap"]}), "identity.order: unknown resolver(s) ldap"),
    bad(ident({"order": ["config"], "user": 42}), "identity.user must be a string"),
    bad(ident({"order": ["notebook_tag"], "owner_tag": ["o"]}), "identity.owner_tag must be a string"),
    bad(ident(rules={"a": 1}), "mapping.rules must be a list of rule objects, not dict"),
    bad(ident(rules=["x"]), "mapping.rules[1] must be an object with 'table', 'regex' or 'template'"),
    bad(ident(rules=[{}]), "mapping.rules[1] has none of 'table', 'regex', 'template'"),
    bad(ident(rules=[{"regex": "(", "principal": "{name}@KERB.TEST"}]), "mapping.rules[1].regex '(' does not compile"),
    bad(ident(rules=[{"regex": 5, "principal": "x@KERB.TEST"}]), "mapping.rules[1].regex must be a string"),
    bad(ident(rules=[{"regex": "^(?P<u>.*)$"}]), "mapping.rules[1].principal (the template of the result) is required"),
    bad(ident(rules=[{"regex": "^(?P<u>.*)$", "principal": "{user}@KERB.TEST"}]),
        "mapping.rules[1].principal '{user}@KERB.TEST' uses {user}"),
    bad(ident(rules=[{"template": 5}]), "mapping.rules[1].template must be a string, not int 5"),
    bad(ident(rules=[{"template": "{local.upper}@KERB.TEST"}]), "uses {local.upper}; allowed: {domain}, {local}"),
    bad(ident(rules=[{"template": "{local}@KERB.TEST", "case": "title"}]),
        "mapping.rules[1].case must be keep, lower or upper, not 'title'"),
    bad(ident(rules=[{"template": "{local}@KERB.TEST", "domain": 1}]), "mapping.rules[1].domain must be a string"),
    bad(ident(rules=[{"table": ["alice"]}]), "mapping.rules[1].table must be an object of identity -> principal"),
    bad(ident(rules=[{"table": {"alice@example.com": 1}}]), "mapping.rules[1].table must be an object"),
    bad(ident(rules=[{"table": {}, "case_insensitive": "yes"}]), "mapping.rules[1].case_insensitive must be true"),
    bad({"clusters": {"a": {"host": "h", "options": ["x"]}}}, "clusters.a.options must be an object"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES)
async def test_each_kind_of_bad_value_is_an_error_state_naming_it(overrides, message, kj_config, sandbox,
                                                                 jp_serverapp, jp_fetch):
    """The configuration is rewritten after the server read a good one; a renew request applies the edit."""
    from conftest import write_config

    await start_extensions(jp_serverapp)
    await wait_state(jp_fetch, "valid")
    write_config(kj_config, sandbox, **overrides)
    try:
        await jp_fetch("kerb-jupyter", "api", "renew", method="POST", body=b"")
    except HTTPClientError as err:
        assert err.code == 409, err
        body = json.loads(err.response.body)
        assert body["error"]["code"] == "not_configured" and message in body["error"]["message"]
    else:
        raise AssertionError("a renew request with a broken configuration answered 200")
    doc = json.loads((await jp_fetch("kerb-jupyter", "api", "status")).body)
    assert doc["state"] == "error" and message in doc["last_error"]["message"], doc
    page = await jp_fetch("kerb-jupyter/")  # the page stays up
    assert page.code == 200


async def test_a_bad_value_at_start_up_then_fixed_without_a_restart(kj_config, sandbox, jp_serverapp, jp_fetch):
    from conftest import write_config

    write_config(kj_config, sandbox, source={"type": "keytab", "keytab": 42})
    from helpers import extension

    ext = extension(jp_serverapp)
    ext._configure()  # the server read the broken file at start-up
    await start_extensions(jp_serverapp)
    doc = json.loads((await jp_fetch("kerb-jupyter", "api", "status")).body)
    assert doc["state"] == "error" and "source.keytab must be a string" in doc["last_error"]["message"]
    write_config(kj_config, sandbox)
    r = await jp_fetch("kerb-jupyter", "api", "renew", method="POST", body=b"")
    assert r.code == 200 and json.loads(r.body)["state"] == "valid"


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
    [line] = [x for x in log.splitlines() if "kerb_jupyter 0.2.0:" in x]
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
