"""Fixtures: one real sandbox realm with two PostgreSQL clusters per test session, and a Jupyter server
with the extension configured against it (pytest-jupyter)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kerb_jupyter.core import tickets
from kerb_jupyter.sandbox import Sandbox
from kerb_jupyter.sandbox.ad import ADSandbox
from kerb_jupyter.sandbox.broker import BrokerSandbox

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    sb = Sandbox(tmp_path_factory.mktemp("sandbox"), clusters=("analytics", "finance"),
                 max_life=3600, max_renewable_life=7 * 86400)
    sb.start()
    old = os.environ.get("KRB5_CONFIG")
    os.environ["KRB5_CONFIG"] = str(sb.realm.krb5_conf)
    yield sb
    sb.stop()
    if old is None:
        os.environ.pop("KRB5_CONFIG", None)
    else:
        os.environ["KRB5_CONFIG"] = old


@pytest.fixture(scope="session")
def ad_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ADSandbox]:
    """A real Samba AD DC (users, groups, delegation and keytabs from ``kerb_jupyter.sandbox.samba.PLAN``) and one
    PostgreSQL cluster per planned cluster, started once per session (15-100 s: provisioning is most of it).
    Tests that use it set KRB5_CONFIG themselves (``ad_sandbox.env``); nothing here changes the environment."""
    sb = ADSandbox(tmp_path_factory.mktemp("adsandbox"))
    sb.start()  # a DC that cannot start raises SandboxError with samba's own log lines
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture(scope="session")
def bsb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerSandbox]:
    """The running broker (LDAP realm, moto STS with SigV4 verification, a broker process) that the
    test_broker_service*.py modules share: started once for all of them, stopped at the end of the session.
    Modules that need a broker of their own define their own ``bsb``."""
    sb = BrokerSandbox(tmp_path_factory.mktemp("broker-service"))
    sb.start()
    try:
        sb.realm.add_user("bob")  # in the directory, in no group
        sb.realm.add_principal("postgres/other")  # a cluster the broker may not delegate to
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def bsb_krb5(bsb: BrokerSandbox) -> None:
    """Point Kerberos at the broker realm (``pytestmark = pytest.mark.usefixtures("bsb_krb5")``)."""
    os.environ["KRB5_CONFIG"] = str(bsb.realm.krb5_conf)


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@contextmanager
def kerbsql_shell(monkeypatch: pytest.MonkeyPatch, cache: Path, config: Path) -> Iterator[Any]:
    """A real IPython shell with kerb_jupyter loaded, using the ticket in ``cache`` and the config file ``config``."""
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setenv("KRB5CCNAME", f"FILE:{cache}")
    monkeypatch.setenv("KERB_JUPYTER_CONFIG", str(config))
    sh = InteractiveShell.instance()
    sh.run_cell("%load_ext kerb_jupyter")
    try:
        yield sh
    finally:
        sh.run_cell("%unload_ext kerb_jupyter")
        InteractiveShell.clear_instance()


def write_config(path: Path, sandbox: Sandbox, **overrides: Any) -> Path:
    config: dict[str, Any] = {
        "principal": sandbox.principal,
        "source": {"type": "keytab", "keytab": str(sandbox.keytab)},
        "state_dir": str(path.parent / "state"),
        "clusters": {name: sandbox.cluster_config(name) for name in sandbox.servers},
    }
    config.update(overrides)
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def kj_config(tmp_path: Path, sandbox: Sandbox) -> Path:
    """A per-test kerb_jupyter configuration (own state dir) against the session sandbox."""
    return write_config(tmp_path / "kerb_jupyter.json", sandbox)


@pytest.fixture
def jp_server_config(kj_config: Path) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"kerb_jupyter": True}},
        "KerbJupyterApp": {"config_file": str(kj_config), "retry_interval": 0.5},
    }


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def shell(sandbox, tmp_path, monkeypatch):
    """A real IPython shell with the extension loaded, a fresh ticket in a FILE cache, and an audit log (the Arrow
    and export tests'; modules with a shell of their own define ``shell`` themselves)."""
    cache = tmp_path / "state" / "krb5cc"
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    config = write_config(tmp_path / "kerb_jupyter.json", sandbox, audit_log=str(tmp_path / "audit.jsonl"))
    with kerbsql_shell(monkeypatch, cache, config) as sh:
        yield sh


@pytest.fixture
def conn(shell):
    """The shell's own connection to the analytics cluster (the one %kerbsql uses)."""
    shell.run_cell("%kerbsql analytics SELECT 1")
    return shell.magics_manager.registry["KerbSqlMagics"].session.connection("analytics")


@pytest.fixture
def cache(tmp_path) -> Path:
    """The keeper tests' FILE cache, made this test's KRB5CCNAME (it replaces pytest's own ``cache`` fixture in this
    suite, which no test uses)."""
    path = tmp_path / "state" / "krb5cc"
    os.environ["KRB5CCNAME"] = f"FILE:{path}"
    return path
