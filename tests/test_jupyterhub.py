"""JupyterHub: the ``jupyterhub`` identity resolver asks the hub's API (a real HTTP server speaking ``GET /user``)
who owns the server's token; and a real hub (LocalProcessSpawner, a real Unix user) spawns a server whose
kerb_jupyter reports that user as enforced by the hub."""

from __future__ import annotations

import http.cookiejar
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from unprivileged import ROOT, user_python

from kerb_jupyter import IdentityError
from kerb_jupyter.core.identity import IdentityResolver
from kerb_jupyter.sandbox.procs import free_port

HUB_CONFIG = ROOT / "jupyterhub" / "jupyterhub_config.py"
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


def _wait_for_status(browser: Browser, hub: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """Log in through the hub's form (which spawns the server), then the user's kerb_jupyter status once the
    keeper holds a ticket. Fails with the hub's log if the hub dies or nothing comes."""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        if hub.poll() is not None:
            pytest.fail(f"the hub exited ({hub.returncode}):\n{log.read_text()[-4000:]}")
        try:
            browser.login(HUB_USER, HUB_PASSWORD)
            break
        except (OSError, StopIteration):
            time.sleep(0.5)
    last = ""
    while time.monotonic() < deadline:
        # A page first, as a browser would: the user's server sends it through the hub's OAuth and sets its cookie.
        browser.get(f"/user/{HUB_USER}/kerb-jupyter/")
        if hub.poll() is not None:
            pytest.fail(f"the hub exited ({hub.returncode}):\n{log.read_text()[-4000:]}")
        code, kind, body = browser.get(f"/user/{HUB_USER}/kerb-jupyter/api/status")
        last = f"{code} {kind} {body[:300]}"
        if code == 200 and kind.startswith("application/json"):
            doc: dict[str, Any] = json.loads(body)
            if doc.get("expires_at") or doc.get("state") == "error":
                return doc
        time.sleep(1)
    pytest.fail(f"no kerb_jupyter status from the user's server; last answer {last}\n{log.read_text()[-4000:]}")


# -- a real hub ------------------------------------------------------------------------------------------------
HUB_USER, HUB_PASSWORD = "kjhubuser", "kj-Hub-pw-42"


@pytest.fixture
def unix_user() -> Iterator[pwd.struct_passwd]:
    """A real Unix account with a password (PAM logs it in), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the hub spawns each user's server as that user")
    created = subprocess.run(["id", HUB_USER], capture_output=True).returncode != 0
    if created:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", HUB_USER], check=True)
    subprocess.run(["chpasswd"], input=f"{HUB_USER}:{HUB_PASSWORD}\n", text=True, check=True)
    yield pwd.getpwnam(HUB_USER)
    if created:
        subprocess.run(["userdel", "--remove", HUB_USER], capture_output=True)


class Browser:
    """A cookie-keeping HTTP client that follows redirects, as a browser does (urllib's opener)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> tuple[int, str, str]:
        try:
            with self.opener.open(self.base + path, timeout=30) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type", ""), err.read().decode(errors="replace")

    def login(self, user: str, password: str) -> str:
        self.get("/hub/login")
        xsrf = next(c.value for c in self.jar if c.name == "_xsrf")
        form = urllib.parse.urlencode({"username": user, "password": password, "_xsrf": xsrf}).encode()
        with self.opener.open(self.base + "/hub/login?next=", data=form, timeout=120) as resp:
            return resp.geturl()


def test_a_real_hub_spawns_a_server_whose_identity_the_hub_enforces(sandbox, unix_user, tmp_path):
    if shutil.which("configurable-http-proxy") is None:
        pytest.fail("configurable-http-proxy is not installed: run scripts/setup (npm install -g)")
    python = user_python(HUB_USER)
    home = Path(unix_user.pw_dir)
    # What the admin provides for the user: the realm's krb5.conf, kerb_jupyter's configuration (identity from
    # the hub, mapped to a principal) and, for this test, a keytab the user owns as the credential source.
    conf_dir = home / "kj"
    conf_dir.mkdir(exist_ok=True)
    shutil.copy(sandbox.realm.krb5_conf, conf_dir / "krb5.conf")
    shutil.copy(sandbox.keytab, conf_dir / "user.keytab")
    (conf_dir / "config.json").write_text(json.dumps({
        "identity": {"order": ["jupyterhub"]},
        "mapping": {"rules": [{"table": {HUB_USER: sandbox.principal}}]},
        "source": {"type": "keytab", "keytab": str(conf_dir / "user.keytab")},
        "state_dir": str(home / "kj-state"),
        "clusters": {name: sandbox.cluster_config(name) for name in sandbox.servers},
    }))
    for path in (conf_dir, *conf_dir.iterdir()):
        os.chown(path, unix_user.pw_uid, unix_user.pw_gid)
    os.chmod(conf_dir / "user.keytab", 0o600)
    port, hub_port, proxy_port = free_port(), free_port(), free_port()
    (tmp_path / "local_config.py").write_text(  # the example configuration, plus this test's ports and files
        f"load_subconfig({str(HUB_CONFIG)!r})\n"
        f"c.JupyterHub.hub_bind_url = 'http://127.0.0.1:{hub_port}'\n"
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{proxy_port}'\n"
        f"c.JupyterHub.db_url = 'sqlite:///{tmp_path}/hub.sqlite'\n"
        f"c.JupyterHub.cookie_secret_file = '{tmp_path}/cookie_secret'\n"
        f"c.ConfigurableHTTPProxy.pid_file = '{tmp_path}/proxy.pid'\n")
    env = {**os.environ, "KJ_HUB_URL": f"http://127.0.0.1:{port}", "KJ_HUB_USERS": HUB_USER,
           "KJ_SINGLEUSER": str(python.parent / "jupyterhub-singleuser"),
           "KJ_KRB5_CONFIG": str(conf_dir / "krb5.conf"), "KJ_CONFIG": str(conf_dir / "config.json"),
           "KRB5_CONFIG": "/nonexistent/krb5.conf"}  # the hub's own KRB5_* must not matter to the user's server
    log = tmp_path / "hub.log"
    with open(log, "w") as out:
        hub = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(tmp_path / "local_config.py")],
                               cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        browser = Browser(f"http://127.0.0.1:{port}")
        status = _wait_for_status(browser, hub, log)
    finally:
        hub.send_signal(signal.SIGTERM)
        hub.wait(60)
    assert status["identity"] == {"name": HUB_USER, "source": "jupyterhub", "trusted": True, "arn": None,
                                  "detail": f"confirmed by the hub at http://127.0.0.1:{hub_port}/hub/api"}
    assert status["principal"] == sandbox.principal and status["expires_at"]
    assert status["state"] == "valid", status
    # The server ran as the Unix user: the keeper's state and ticket cache are theirs.
    assert (home / "kj-state").stat().st_uid == unix_user.pw_uid
