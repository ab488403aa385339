"""The extension inside a real Jupyter server (pytest-jupyter) against the real KDC and PostgreSQL."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from tornado.httpclient import HTTPClientError

from kerb_jupyter import tickets

from helpers import start_extensions, wait_state


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


@pytest.mark.parametrize("identity_config", [("Alice@Example.com", {"template": "{local}@kerb.test", "case": "lower"})], indirect=True)
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
