"""Two real broker processes sharing one real redis-server (#9): replays and limits hold across both, a Redis
outage makes both refuse with 503 (audited, logged once), and they issue again when Redis is back."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from kerb_jupyter.broker.audit import read_records
from kerb_jupyter.core.signing import sign_request
from kerb_jupyter.sandbox.broker import AUDIENCE, BrokerSandbox
from kerb_jupyter.sandbox.procs import free_port, tail, wait_for_port
from kerb_jupyter.sandbox.redis_server import RedisServer
from kerb_jupyter.sandbox.sts import REGION, SSO_ROLE

PER_PRINCIPAL = 4


class BrokerProcess:
    """One ``kerb-jupyter broker`` process with its own port and audit log, configured like the sandbox's."""

    def __init__(self, sb: BrokerSandbox, name: str, **overrides: Any) -> None:
        self.dir = sb.root / name
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self.port = free_port()
        self.audit_log = self.dir / "audit.jsonl"
        self.log_file = self.dir / "broker.log"
        doc = json.loads(sb.broker_config.read_text())
        doc.update(overrides, audit_log=str(self.audit_log))
        doc["listen"] = {"address": "127.0.0.1", "port": self.port}
        self.config = self.dir / "broker.json"
        self.config.write_text(json.dumps(doc))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KRB5CCNAME", "KERB_JUPYTER"))}
        env["KRB5_CONFIG"] = str(sb.realm.krb5_conf)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from kerb_jupyter.cli import main; sys.exit(main())",
                 "broker", "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        if not wait_for_port(self.port, self.proc, 30):
            self.stop()
            raise AssertionError(f"broker {name} did not start: {tail(self.log_file.read_text())}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.url + "/v1/credentials", data=json.dumps(payload).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return err.code

    def metrics(self) -> dict[str, float]:
        """The store's samples on GET /metrics (name -> value)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {name: float(value) for name, value in
                (line.split(" ", 1) for line in text.splitlines() if line.startswith("kerb_jupyter_broker_store_"))}

    def audited(self, request_id: str) -> dict[str, Any]:
        found = [r for r in read_records(self.audit_log) if r["request_id"] == request_id]
        assert len(found) == 1, found
        return found[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def scale(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BrokerSandbox, RedisServer, list[BrokerProcess]]]:
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        pytest.fail("redis-server is not installed: run scripts/setup (Debian package redis-server)")
    root = tmp_path_factory.mktemp("scale")
    sb = BrokerSandbox(root / "sb")
    srv = RedisServer(root / "redis")
    brokers: list[BrokerProcess] = []
    try:
        sb.start()
        sb.stop_broker()  # the sandbox's own (memory store) broker is not part of this
        srv.start()
        limits = {"per_principal": [PER_PRINCIPAL, 600], "per_arn": [100, 600]}
        brokers = [BrokerProcess(sb, f"broker-{n}", store=srv.url, limits=limits) for n in "ab"]
        yield sb, srv, brokers
    finally:
        for b in brokers:
            b.stop()
        srv.stop()
        sb.stop()


@pytest.fixture
def fresh(scale: tuple[BrokerSandbox, RedisServer, list[BrokerProcess]]) -> tuple[Any, ...]:
    """The shared brokers with an empty store (no replay records or counters from other tests)."""
    redis.Redis.from_url(scale[1].url).flushdb()
    return scale


def signed(sb: BrokerSandbox, session: str = "alice") -> dict[str, Any]:
    from botocore.credentials import Credentials

    c = sb.sts.session(SSO_ROLE, session)
    creds = Credentials(c["aws_access_key_id"], c["aws_secret_access_key"], c["aws_session_token"])
    return sign_request(creds, REGION, sb.sts.url + "/", AUDIENCE)


def test_a_request_used_at_one_broker_is_refused_at_the_other(fresh):
    sb, _srv, (a, b) = fresh
    p = signed(sb)
    code, body = a.post(p)
    assert code == 200, body
    assert a.audited(body["request_id"])["decision"] == "issued"
    code, body = b.post(p)
    assert code == 401 and body["error"] == "unauthenticated", body
    assert b.audited(body["request_id"])["reason"] == "replay"


def test_a_per_principal_limit_holds_across_both_brokers(fresh):
    sb, _srv, (a, b) = fresh
    answers = [(broker, *broker.post(signed(sb))) for broker in (a, b, a, b, a, b)]
    codes = [code for _broker, code, _body in answers]
    assert codes == [200] * PER_PRINCIPAL + [429, 429], codes
    for broker, _code, body in answers[PER_PRINCIPAL:]:
        assert broker.audited(body["request_id"])["reason"] == "rate_limited_principal"


def test_redis_down_means_503_audited_and_back_means_issuing_again(fresh):
    sb, srv, brokers = fresh
    before = [broker.metrics() for broker in brokers]
    assert all(m["kerb_jupyter_broker_store_up"] == 1.0 for m in before), before
    srv.stop()
    try:
        for broker, seen in zip(brokers, before):
            assert broker.health() == 503
            for _ in range(3):
                code, body = broker.post(signed(sb))
                assert code == 503 and body["error"] == "store_unavailable", body
                record = broker.audited(body["request_id"])
                assert record["decision"] == "refused" and record["reason"] == "store_unavailable"
            lines = broker.log_file.read_text().splitlines()
            outage_lines = [line for line in lines if "ERROR kerb_jupyter.broker.redis_store" in line]
            assert len(outage_lines) == 1, outage_lines  # one ERROR per outage, not per request
            refusal_lines = [line for line in lines if "WARNING" in line and "store_unavailable" in line]
            assert len(refusal_lines) == 1, refusal_lines  # and one refusal WARNING per outage
            now = broker.metrics()
            grew = {k.removeprefix("kerb_jupyter_broker_store_"): now[k] - seen[k] for k in now}
            assert now["kerb_jupyter_broker_store_up"] == 0.0
            assert grew["outages_total"] == 1 and grew["failures_total"] >= 4, grew  # /healthz + 3 requests
    finally:
        srv.start()  # same port; the brokers are not restarted
    for broker in brokers:
        assert broker.health() == 200
        code, body = broker.post(signed(sb))
        assert code == 200, body
        assert broker.audited(body["request_id"])["decision"] == "issued"
        lines = broker.log_file.read_text().splitlines()
        assert sum("is back" in line for line in lines) == 1
        assert sum("the shared store answers again" in line for line in lines) == 1
        assert broker.metrics()["kerb_jupyter_broker_store_up"] == 1.0


UNIT = Path(__file__).resolve().parent.parent / "kerb_jupyter" / "broker" / "kerb-jupyter-broker.service"


def test_the_systemd_unit_is_hardened():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    expected = {"NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                "CapabilityBoundingSet": "", "UMask": "0077", "User": "kerb-jupyter-broker"}
    assert {k: service.get(k) for k in expected} == expected
    assert service["LoadCredential"].startswith("broker.keytab:")  # the keytab reaches only this service
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # SIGHUP reloads the policy
    assert service["ExecStart"].endswith("broker --config /etc/kerb-jupyter/broker.json")


def test_systemd_analyze_verifies_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): the unit is only parsed")
    exe = Path(sys.executable).with_name("kerb-jupyter")  # verify checks that ExecStart exists
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/kerb-jupyter/bin/kerb-jupyter", str(exe)))
    res = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr
    # exposure on systemd's 0-100 scale (shown as 0.0-10.0): 20 = "2.0 OK"
    sec = subprocess.run([analyze, "security", "--offline=true", "--threshold=20", str(unit)], capture_output=True,
                         text=True)
    assert sec.returncode == 0, sec.stdout[-2000:] + sec.stderr
