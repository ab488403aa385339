"""The broker's Redis store against a real, private redis-server: semantics, sharing, failing closed, TLS + AUTH."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kerb_jupyter.broker.redis_store import RedisStore
from kerb_jupyter.broker.store import StoreUnavailable
from kerb_jupyter.broker.stores import make_store
from kerb_jupyter.core.errors import ConfigError
from kerb_jupyter.sandbox.procs import free_port
from kerb_jupyter.sandbox.redis_server import RedisServer, random_password


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as srv:
        yield srv
    assert not srv.running


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def _raw(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, decode_responses=True)


def test_replays_limits_and_cache(server):
    async def run() -> list[object]:
        store = RedisStore(server.url, prefix="t1:")
        try:
            out: list[object] = [await store.first_use("sig-1", 60), await store.first_use("sig-1", 60),
                                 await store.first_use("sig-2", 60)]
            out.append([await store.hit("alice", 3, 60) for _ in range(5)])
            out.append(await store.hit("bob", 3, 60))  # other keys are independent
            await store.put("groups:alice", "a;b", 60)
            out += [await store.get("groups:alice"), await store.get("groups:bob")]
            await store.ping()
            return out
        finally:
            await store.close()

    assert _run(run()) == [True, False, True, [True, True, True, False, False], True, "a;b", None]
    raw = _raw(server)
    assert 0 < raw.pttl("t1:seen:sig-1") <= 60_000  # nothing stays forever
    assert 0 < raw.pttl("t1:hit:alice") <= 60_000
    assert 0 < raw.pttl("t1:val:groups:alice") <= 60_000


def test_entries_expire_and_the_window_slides(server):
    async def run() -> list[object]:
        store = RedisStore(server.url, prefix="t2:")
        try:
            out: list[object] = [await store.first_use("sig", 0.2), await store.hit("k", 1, 0.2),
                                 await store.hit("k", 1, 0.2)]
            await store.put("v", "x", 0.2)
            await asyncio.sleep(0.35)
            out += [await store.first_use("sig", 0.2), await store.hit("k", 1, 0.2), await store.get("v")]
            return out
        finally:
            await store.close()

    assert _run(run()) == [True, True, False, True, True, None]


def test_a_hammered_limit_keeps_only_what_it_needs(server):
    async def run() -> list[bool]:
        store = RedisStore(server.url, prefix="t3:")
        try:
            return [await store.hit("busy", 5, 60) for _ in range(300)]
        finally:
            await store.close()

    results = _run(run())
    assert results[:5] == [True] * 5 and not any(results[5:])
    assert _raw(server).zcard("t3:hit:busy") == 6


def test_two_clients_share_replays_and_limits(server):
    async def run() -> tuple[list[bool], list[bool], list[bool]]:
        a, b = RedisStore(server.url, prefix="t4:"), RedisStore(server.url, prefix="t4:")
        try:
            used = [await a.first_use("sig", 60), await b.first_use("sig", 60)]
            race = await asyncio.gather(*(s.first_use("race", 60) for s in (a, b) for _ in range(25)))
            hits = await asyncio.gather(*(s.hit("principal:alice", 10, 60) for s in (a, b) for _ in range(15)))
            return used, list(race), list(hits)
        finally:
            await a.close()
            await b.close()

    used, race, hits = _run(run())
    assert used == [True, False]  # a request used at one is refused at the other
    assert sorted(race) == [False] * 49 + [True]
    assert hits.count(True) == 10  # a limit of 10 holds across both together


def test_a_burst_beyond_the_connection_pool_waits_instead_of_failing(server):
    async def run() -> list[bool]:
        store = RedisStore(server.url + "?max_connections=4", prefix="t6:")
        try:
            return list(await asyncio.gather(*(store.first_use(f"k{i % 50}", 60) for i in range(400))))
        finally:
            await store.close()

    results = _run(run())
    assert results.count(True) == 50  # every key once; no StoreUnavailable from a full pool


def test_redis_down_fails_closed_logs_once_and_recovers(tmp_path, caplog):
    srv = RedisServer(tmp_path / "r").start()
    caplog.set_level(logging.INFO, logger="kerb_jupyter.broker.redis_store")

    async def run() -> None:
        store = RedisStore(srv.url, prefix="t5:")
        collector = store.collector()
        try:
            assert await store.first_use("before", 60)
            srv.stop()
            for op in (store.ping(), store.first_use("x", 60), store.hit("k", 5, 60), store.get("k"),
                       store.put("k", "v", 60), *(store.first_use(f"n{i}", 60) for i in range(20))):
                with pytest.raises(StoreUnavailable, match="unavailable") as err:
                    await op
                assert err.value.code == "store_unavailable"
            metrics = {m.name: m.samples[0].value for m in collector.collect()}
            assert metrics["kerb_jupyter_broker_store_up"] == 0
            assert metrics["kerb_jupyter_broker_store_failures"] == 25
            assert metrics["kerb_jupyter_broker_store_outages"] == 1
            srv.start()  # same port, empty (no persistence): the same client works again
            await store.ping()
            assert await store.first_use("after", 60)
            assert not await store.first_use("after", 60)
            metrics = {m.name: m.samples[0].value for m in collector.collect()}
            assert metrics["kerb_jupyter_broker_store_up"] == 1
        finally:
            await store.close()
            srv.stop()

    _run(run())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]  # one line per outage, not per request
    assert "is unavailable" in errors[0].getMessage()
    assert sum("is back" in r.getMessage() for r in caplog.records) == 1


def test_a_store_that_never_came_up_is_unavailable(tmp_path):
    port = free_port()  # nothing listens there

    async def run() -> None:
        store = make_store(f"redis://127.0.0.1:{port}/0")
        assert isinstance(store, RedisStore)
        try:
            with pytest.raises(StoreUnavailable):
                await store.first_use("x", 60)
        finally:
            await store.close()

    _run(run())


def _tls_material(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kerb_jupyter test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False).sign(ca_key, hashes.SHA256()))
    root.mkdir(parents=True, exist_ok=True)
    paths = root / "ca.pem", root / "server.pem", root / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths


def test_rediss_with_a_ca_bundle_and_auth(tmp_path, caplog):
    ca, cert, key = _tls_material(tmp_path / "tls")
    other_ca = _tls_material(tmp_path / "other")[0]
    password = random_password()
    pw_file = tmp_path / "redis.password"
    pw_file.write_text(password + "\n")
    caplog.set_level(logging.DEBUG)
    with RedisServer(tmp_path / "r", password=password, tls=(cert, key)) as srv:
        base = f"rediss://127.0.0.1:{srv.port}/0"

        async def run() -> None:
            good = [RedisStore(srv.url + f"?ssl_ca_certs={ca}"),
                    RedisStore(f"{base}?ssl_ca_certs={ca}&password_file={pw_file}")]
            bad = [RedisStore(f"rediss://:wrong-password@127.0.0.1:{srv.port}/0?ssl_ca_certs={ca}"),
                   RedisStore(f"{base}?ssl_ca_certs={ca}"),  # no AUTH
                   RedisStore(f"{base}?ssl_ca_certs={other_ca}&password_file={pw_file}"),  # untrusted server
                   RedisStore(f"redis://127.0.0.1:{srv.port}/0?password_file={pw_file}")]  # plaintext to TLS port
            try:
                assert await good[0].first_use("tls-sig", 60)
                assert not await good[1].first_use("tls-sig", 60)
                for store in bad:
                    with pytest.raises(StoreUnavailable) as err:
                        await store.ping()
                    assert password not in str(err.value)
            finally:
                for store in good + bad:
                    await store.close()

        _run(run())
    assert password not in caplog.text and "wrong-password" not in caplog.text


@pytest.mark.parametrize(
    ("url", "message"),
    [("http://127.0.0.1:6379", "must be redis://"), ("redis://", "must be redis://"),
     ("redis://127.0.0.1:6379/0?foo=1", "unknown option"), ("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/hosts",
                                                            "needs a rediss://"),
     ("rediss://127.0.0.1:6379/0?ssl_ca_certs=/nonexistent/ca.pem", "not a readable file"),
     ("redis://127.0.0.1:6379/0?password_file=/nonexistent/pw", "cannot read the store's password_file"),
     ("redis://127.0.0.1:notaport/0", "malformed"), ("redis://127.0.0.1:6379/0?db=x", "invalid")],
)
def test_bad_store_urls_are_config_errors(url, message):
    with pytest.raises(ConfigError, match=message):
        RedisStore(url)
    if url.startswith("redis"):
        with pytest.raises(ConfigError, match=message):  # the broker's configuration path says the same
            make_store(url)
