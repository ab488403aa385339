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
