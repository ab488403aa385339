"""JupyterHub: the ``jupyterhub`` identity resolver asks the hub's API (a real HTTP server speaking ``GET /user``)
who owns the server's token; and a real hub (LocalProcessSpawner, a real Unix user) spawns a server whose
kerb_jupyter reports that user as enforced by the hub."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from kerb_jupyter import IdentityError
from kerb_jupyter.identity import IdentityResolver
from kerb_jupyter.sandbox.procs import free_port

TOKEN = "s3cret-server-token"  # a test token: the point is that it never shows


class HubAPI:
    """A tiny HTTP server answering ``GET /hub/api/user`` as JupyterHub does for a token it knows."""

    def __init__(self) -> None:
        self.answer: tuple[int, Any] = (200, {"kind": "user", "name": "hubuser", "admin": False})
        self.seen: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.seen.append(f"{self.path} {self.headers.get('Authorization')}")
                status, body = hub.answer
                if self.path != "/hub/api/user" or self.headers.get("Authorization") != f"token {TOKEN}":
                    status, body = 403, {"status": 403, "message": "Missing or invalid credentials"}
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hub/api"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubAPI]:
    api = HubAPI()
    monkeypatch.setenv("JUPYTERHUB_USER", "hubuser")
    monkeypatch.setenv("JUPYTERHUB_API_URL", api.url + "/")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", TOKEN)
    yield api
    api.close()


def resolve(tmp_path: Any, **spec: Any) -> Any:
    return IdentityResolver({"order": ["jupyterhub"], "metadata_file": str(tmp_path / "none"), **spec}).resolve()


def test_the_hub_confirms_the_user(hub, tmp_path):
    who = resolve(tmp_path)
    assert (who.name, who.source, who.trusted) == ("hubuser", "jupyterhub", True)
    assert who.detail == f"confirmed by the hub at {hub.url}"
    assert hub.seen == [f"/hub/api/user token {TOKEN}"]
    # With the hub's API present "auto" is on: the hub's user wins over a claimed identity.user placed first.
    who = resolve(tmp_path, order=["config", "jupyterhub"], user="carol")
    assert (who.name, who.trusted) == ("hubuser", True)


def test_a_user_the_hub_does_not_confirm_is_refused(hub, tmp_path):
    hub.answer = (200, {"kind": "user", "name": "mallory"})
    with pytest.raises(IdentityError) as err:
        resolve(tmp_path)
    assert err.value.code == "identity_mismatch"
    assert "JUPYTERHUB_USER is 'hubuser' but the hub says this server's token belongs to 'mallory'" in str(err.value)


@pytest.mark.parametrize(("answer", "code", "says"), [
    ((403, {"status": 403}), "hub_refused", "refused this server's token (HTTP 403)"),
    ((200, b"<html>login</html>"), "hub_refused", "not JSON"),
    ((200, {"kind": "service", "name": "hubuser"}), "hub_refused", "does not belong to a user"),
    ((200, ["hubuser"]), "hub_refused", "does not belong to a user"),
    ((200, {"kind": "user", "name": "hub\u0455user"}), "bad_identity", "non-ASCII"),
])
def test_bad_hub_answers_are_refused(hub, tmp_path, answer, code, says):
    hub.answer = answer
    with pytest.raises(IdentityError) as err:
        resolve(tmp_path)
    assert err.value.code == code and says in str(err.value)
    assert TOKEN not in str(err.value)


def test_a_wrong_token_or_an_unreachable_hub(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "not-the-token")
    with pytest.raises(IdentityError, match="HTTP 403") as err:
        resolve(tmp_path)
    assert "not-the-token" not in str(err.value)
    monkeypatch.setenv("JUPYTERHUB_API_URL", f"http://127.0.0.1:{free_port()}/hub/api")
    with pytest.raises(IdentityError, match="cannot ask the hub") as err:
        resolve(tmp_path)
    assert err.value.code == "hub_unreachable"
    monkeypatch.setenv("JUPYTERHUB_API_URL", "file:///etc/passwd")
    with pytest.raises(IdentityError, match="not an http") as err:
        resolve(tmp_path)


def test_without_the_hub_api_jupyterhub_user_is_only_claimed(hub, tmp_path, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN")
    who = resolve(tmp_path)
    assert (who.name, who.source, who.trusted) == ("hubuser", "jupyterhub", False)
    assert "no JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN" in who.detail
    assert hub.seen == []
    with pytest.raises(IdentityError, match="'hubuser' is claimed") as err:
        resolve(tmp_path, require_trusted_identity=True)
    assert err.value.code == "untrusted_identity"
