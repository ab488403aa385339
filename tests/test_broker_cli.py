"""``kerb-jupyter sandbox --broker`` and ``kerb-jupyter broker --config``: real processes, clear errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kerb_jupyter.core.config import load_settings
from kerb_jupyter.server.sources import build_source
from kerb_jupyter.sql.db import Session


def test_sandbox_broker_serves_alice_without_a_secret_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kerb_jupyter.cli", "sandbox", "--broker", "--no-lab", "--dir", str(tmp_path / "sb")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        doc = json.loads(proc.stdout.readline())
        assert doc["principal"] == "alice@KERB.TEST" and doc["broker"].startswith("http://127.0.0.1:")
        os.environ.update(doc["env"])
        settings = load_settings(doc["env"]["KERB_JUPYTER_CONFIG"])
        assert settings.source["type"] == "broker" and settings.principal is None
        _, principal = build_source(settings.source).resolver(settings.cache_path)()  # type: ignore[attr-defined]
        assert principal == "alice@KERB.TEST"
        os.environ["KRB5CCNAME"] = f"FILE:{settings.cache_path}"
        session = Session(settings)
        for cluster in ("analytics", "finance"):
            row = session.connection(cluster).execute("SELECT current_user, count(*) FROM trips").fetchone()
            assert row == ("alice@KERB.TEST", 1000)
        session.close()
        broker_port = int(doc["broker"].rsplit(":", 1)[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker_port), timeout=1)


def run_broker(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kerb_jupyter.cli", "broker", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_broker_with_a_missing_config_says_so(tmp_path: Path) -> None:
    out = run_broker(tmp_path / "nope.json")
    assert out.returncode == 1
    assert out.stderr.strip() == f"kerb-jupyter: the broker configuration {tmp_path / 'nope.json'} does not exist"


def test_broker_refuses_to_start_with_a_rule_trusting_a_caller_chosen_name(tmp_path: Path) -> None:
    config = tmp_path / "broker.json"
    config.write_text(json.dumps({
        "audience": "b.test", "sts": {"endpoint": "https://sts.us-east-1.amazonaws.com/"},
        "kerberos": {"principal": "broker/h@KERB.TEST", "keytab": str(tmp_path / "k")},
        "clusters": {"a": "postgres/h@KERB.TEST"},
        "policy": {"rules": [{"account": "123456789012", "role": "SageMakerRole", "identity_from": "session",
                              "mapping": {"rules": [{"template": "{name}@KERB.TEST"}]}, "clusters": ["a"]}]},
    }))
    out = run_broker(config)
    assert out.returncode == 1 and "trust_caller_chosen" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("spec", "match"), [
    ({"url": "http://broker.example.com", "audience": "a", "region": "r"}, "https://"),
    ({"url": "https://b", "audience": "a"}, "source.region"),
    ({"url": "https://b", "audience": "a", "region": "r", "colour": 1}, "unknown key"),
    ({"url": "https://b", "audience": "a", "region": "r", "ca_bundle": "/nonexistent.pem"}, "ca_bundle"),
])
def test_broker_source_settings_are_checked(spec: dict[str, object], match: str) -> None:
    from kerb_jupyter.core.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        build_source({"type": "broker", **spec})


def test_the_broker_imports_no_server_or_kernel_code() -> None:
    code = (
        "import sys, kerb_jupyter.broker.app, kerb_jupyter.broker.issue, kerb_jupyter.broker.groups;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jupyter_server', 'IPython', 'ipykernel')"
        " or m in ('kerb_jupyter.magic', 'kerb_jupyter.server.handlers', 'kerb_jupyter.server.app'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
