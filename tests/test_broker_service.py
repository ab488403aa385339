"""The running broker's request path: an issue audited, the notebook's source, TLS, LDAPS, audit-log links."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from brokerservice import audited, creds, outcomes, payload, post, variant

from kerb_jupyter.broker.app import Broker, Refused
from kerb_jupyter.broker.audit import AuditLog, read_records
from kerb_jupyter.broker.settings import load_broker_settings
from kerb_jupyter.core.errors import ConfigError, CredentialsRejectedError, KdcUnreachableError
from kerb_jupyter.sandbox.broker import AUDIENCE, BrokerSandbox
from kerb_jupyter.sandbox.sts import REGION, SSO_ROLE
from kerb_jupyter.server.brokersource import build_broker_source

pytestmark = pytest.mark.usefixtures("bsb_krb5")  # the shared broker sandbox (conftest: bsb)


def test_alice_gets_both_clusters_and_it_is_audited(bsb: BrokerSandbox) -> None:
    code, body = post(bsb, payload(bsb, creds(bsb)))
    assert code == 200, body
    assert body["principal"] == bsb.principal and sorted(body["clusters"]) == ["analytics", "finance"]
    assert set(body) == {"principal", "clusters", "refused", "expires", "cache", "caller_arn", "request_id"}
    assert body["refused"] == {}
    assert body["clusters"]["finance"]["spn"] == bsb.spn("finance")
    record = audited(bsb, body["request_id"])
    assert record["decision"] == "issued" and record["caller_arn"].endswith(f"/{SSO_ROLE}/alice")
    assert record["source"] == "127.0.0.1" and record["clusters"] == ["analytics", "finance"]
    assert "cache" not in record and body["cache"] not in bsb.audit_log.read_text()


def test_the_notebook_source_reports_refusals_plainly(bsb: BrokerSandbox, tmp_path: Path) -> None:

    src = build_broker_source({"type": "broker", "url": bsb.broker_url, "audience": AUDIENCE, "region": REGION,
                               "sts_url": bsb.sts.url + "/"})
    src.credentials = lambda: creds(bsb, "bob")
    with pytest.raises(CredentialsRejectedError, match="refused this notebook's AWS identity") as err:
        src.acquire(None, tmp_path / "cc", None, None)
    assert "request id" in str(err.value) and "no_group" not in str(err.value)  # the reason stays in the broker
    assert not (tmp_path / "cc").exists()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def test_tls_with_the_notebook_checking_the_broker_against_its_ca_bundle(bsb: BrokerSandbox,
                                                                        tmp_path: Path) -> None:
    from kerb_jupyter.sandbox.procs import free_port

    cert, key = _self_signed(tmp_path)
    port = free_port()
    path = variant(bsb, tmp_path, listen={"port": port, "tls_cert": str(cert), "tls_key": str(key)})
    spec = {"type": "broker", "url": f"https://localhost:{port}", "audience": AUDIENCE, "region": REGION,
            "sts_url": bsb.sts.url + "/"}

    async def run() -> tuple[str, str]:
        broker = Broker(load_broker_settings(path))
        server = broker.listen()
        try:
            src = build_broker_source({**spec, "ca_bundle": str(cert)})
            src.credentials = lambda: creds(bsb)
            info = await asyncio.to_thread(src.acquire, None, tmp_path / "state" / "krb5cc", None, None)
            untrusting = build_broker_source(spec)  # the system CAs do not know this certificate
            untrusting.credentials = lambda: creds(bsb)
            try:
                await asyncio.to_thread(untrusting.acquire, None, tmp_path / "other" / "krb5cc", None, None)
                refused = "accepted"
            except KdcUnreachableError as err:
                refused = str(err)
            return info.principal, refused
        finally:
            server.stop()
            await broker.close()

    principal, refused = asyncio.run(run())
    assert principal == bsb.principal
    assert "CERTIFICATE_VERIFY_FAILED" in refused


def test_the_audit_log_never_writes_through_a_symlink(tmp_path: Path) -> None:
    """A link planted at the audit log's path: refused at start-up (ConfigError naming it) and per record."""
    victim = tmp_path / "victim"
    victim.write_text("")
    planted = tmp_path / "planted.jsonl"
    planted.symlink_to(victim)
    with pytest.raises(ConfigError, match=r"planted\.jsonl: .*symbolic link"):
        AuditLog(planted)
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    audit.record(request_id="r1", source="127.0.0.1", decision="refused", reason="replay")
    path.unlink()
    path.symlink_to(victim)
    with pytest.raises(OSError):
        audit.record(request_id="r2", source="127.0.0.1", decision="refused", reason="replay")
    assert victim.read_text() == ""


class TlsRecorder:
    """A real TLS listener (its own CA) that records every handshake and every byte of application data."""

    def __init__(self, root: Path) -> None:
        import socket
        import ssl
        import threading

        from kerb_jupyter.sandbox.ldap import make_tls

        root.mkdir(parents=True, exist_ok=True)
        self.ca, cert, key = make_tls(root, ("127.0.0.1",))
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.handshakes, self.failed, self.received = 0, 0, b""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import ssl

        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.settimeout(3)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    while chunk := tls.recv(4096):  # never answers: the client times out
                        self.received += chunk
            except (ssl.SSLError, OSError):
                self.failed += 1
            finally:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def _ldap_refusal(bsb: BrokerSandbox, tmp_path: Path, request_id: str, **ldap: Any) -> Refused:
    path = variant(bsb, tmp_path, ldap={"timeout": 1, **ldap})
    broker = Broker(load_broker_settings(path))
    with pytest.raises(Refused) as err:
        asyncio.run(broker.handle(json.dumps(payload(bsb, creds(bsb))).encode(), "127.0.0.1", request_id))
    return err.value


def test_ldaps_with_a_wrong_ca_never_sends_the_password(bsb: BrokerSandbox, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    password = bsb.realm.slapd.reader_password.encode()
    recorder = TlsRecorder(tmp_path / "impostor")
    try:
        url = f"ldaps://127.0.0.1:{recorder.port}"
        # The broker trusts the real directory's CA, not the impostor's: no handshake, nothing sent.
        err = _ldap_refusal(bsb, tmp_path, "wrong-ca", url=url, ca_bundle=str(bsb.realm.slapd.ca_cert))
        assert err.status == 503 and err.reason == "ldap_unavailable" and "CERTIFICATE_VERIFY_FAILED" in err.detail
        assert recorder.handshakes == 0 and recorder.failed >= 1 and recorder.received == b""
        # The same listener trusted (its CA given): the handshake completes and the bind, password included,
        # arrives - so an empty recording above means nothing was sent, not that the recorder missed it.
        _ldap_refusal(bsb, tmp_path / "trusting", "trusting", url=url, ca_bundle=str(recorder.ca))
        assert recorder.handshakes == 1 and password in recorder.received
    finally:
        recorder.close()
    record = read_records(tmp_path / "audit.jsonl")[0]
    assert record["request_id"] == "wrong-ca" and record["reason"] == "ldap_unavailable"
    assert record["caller_arn"].endswith("/alice")
    logged = bsb.audit_log.read_text() + (tmp_path / "audit.jsonl").read_text() + caplog.text
    assert password.decode() not in logged


def test_ldaps_checks_the_host_name_and_the_real_directory_with_a_wrong_ca(bsb: BrokerSandbox,
                                                                          tmp_path: Path) -> None:
    slapd = bsb.realm.slapd
    impostor_ca = TlsRecorder(tmp_path / "other-ca")
    impostor_ca.close()
    err = _ldap_refusal(bsb, tmp_path, "real-wrong-ca", url=slapd.ldaps_url, ca_bundle=str(impostor_ca.ca))
    assert err.reason == "ldap_unavailable" and "CERTIFICATE_VERIFY_FAILED" in err.detail
    err = _ldap_refusal(bsb, tmp_path / "name", "wrong-name", url=slapd.ldaps_url, ca_bundle=str(slapd.ca_cert),
                        server_name="dc1.elsewhere.test")  # the right CA, a certificate for another name
    assert err.reason == "ldap_unavailable" and "dc1.elsewhere.test" in err.detail
    path = variant(bsb, tmp_path / "ok", ldap={"url": slapd.ldaps_url, "ca_bundle": str(slapd.ca_cert),
                                                 "server_name": "localhost"})
    assert outcomes(bsb, Broker(load_broker_settings(path)), [(creds(bsb), "127.0.0.1")]) == ["issued"]


def test_plain_ldap_needs_an_explicit_opt_in_and_is_logged(bsb: BrokerSandbox, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    plain = {"url": bsb.realm.slapd.url, "ca_bundle": None}
    with pytest.raises(ConfigError, match="plain LDAP: the bind password"):
        load_broker_settings(variant(bsb, tmp_path, ldap=plain))
    path = variant(bsb, tmp_path, ldap={**plain, "allow_plain_ldap": True})
    caplog.set_level(logging.WARNING, logger="kerb_jupyter.broker")
    broker = Broker(load_broker_settings(path))
    assert any("is plain LDAP (allow_plain_ldap)" in r.getMessage() for r in caplog.records)
    assert outcomes(bsb, broker, [(creds(bsb), "127.0.0.1")]) == ["issued"]
