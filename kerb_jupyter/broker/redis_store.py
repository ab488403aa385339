"""The broker's shared state in Redis (ElastiCache, Valkey): atomic replay refusal and limits, failing closed.

    "store": "rediss://:AUTH@master.example.cache.amazonaws.com:6379/0?ssl_ca_certs=/etc/ssl/certs/ca.pem"

Options in the URL's query: ``ssl_ca_certs`` (a CA bundle, rediss:// only), ``password_file`` (the AUTH password
read from a file instead of the URL), ``db``, ``socket_timeout``, ``socket_connect_timeout``, ``max_connections``,
``health_check_interval``, ``ssl_check_hostname``. Any Redis failure (connection, timeout, AUTH, TLS, a refused
command) becomes :class:`StoreUnavailable`; the first failure of an outage is logged once, the recovery once, and
the client reconnects by itself. Limits use the Redis server's clock, so instances' clocks need not agree.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..core.errors import ConfigError
from .store import StoreUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_OPTIONS = {"ssl_ca_certs", "password_file", "db", "socket_timeout", "socket_connect_timeout", "max_connections",
            "health_check_interval", "ssl_check_hostname"}

# A sliding window on a sorted set scored by the server's clock (microseconds). The event counts even when it
# is refused (as in MemoryStore); only the newest limit+1 entries are kept, which gives the same answers.
_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[3]) + 2))
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return redis.call('ZCARD', KEYS[1])
"""


class RedisStore:
    """The :class:`~kerb_jupyter.broker.store.Store` on Redis; ``prefix`` namespaces the keys of one deployment."""

    def __init__(self, url: str, *, prefix: str = "kj:", socket_timeout: float = 2.0,
                 pool_timeout: float = 5.0) -> None:
        client_url, kwargs, self.where = _parse(url)
        kwargs.setdefault("socket_timeout", socket_timeout)
        kwargs.setdefault("socket_connect_timeout", socket_timeout)
        kwargs.setdefault("health_check_interval", 30)
        kwargs.setdefault("max_connections", 50)
        # A bounded pool that queues callers (up to ``pool_timeout`` s) rather than failing at the limit: a burst of
        # requests must not look like an outage. One immediate retry on a fresh connection: a pooled connection
        # from before a Redis restart fails once.
        try:
            pool = aioredis.BlockingConnectionPool.from_url(
                client_url, timeout=max(pool_timeout, socket_timeout), retry=Retry(NoBackoff(), 1),
                decode_responses=True, **kwargs)
        except ValueError as err:  # a bad db number or option value; the message names the option only
            raise ConfigError(f"the store URL is invalid: {err}") from None
        self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        self._hit = self._redis.register_script(_HIT)
        self.prefix = prefix
        self.failures = 0  # operations refused because Redis failed
        self.outages = 0  # distinct periods of unavailability
        self._down_since: float | None = None

    @property
    def up(self) -> bool:
        return self._down_since is None

    async def first_use(self, key: str, ttl: float) -> bool:
        done = await self._call(lambda: self._redis.set(self.prefix + "seen:" + key, "1", nx=True, px=_ms(ttl)))
        return bool(done)

    async def hit(self, key: str, limit: int, window: float) -> bool:
        member = secrets.token_hex(8)
        count = await self._call(lambda: self._hit(keys=[self.prefix + "hit:" + key],
                                                    args=[_ms(window) * 1000, member, max(limit, 0)]))
        return int(count) <= limit

    async def get(self, key: str) -> str | None:
        value = await self._call(lambda: self._redis.get(self.prefix + "val:" + key))
        return None if value is None else str(value)

    async def put(self, key: str, value: str, ttl: float) -> None:
        await self._call(lambda: self._redis.set(self.prefix + "val:" + key, value, px=_ms(ttl)))

    async def ping(self) -> None:
        await self._call(self._redis.ping)

    async def close(self) -> None:
        try:
            await self._redis.aclose()
        except (RedisError, OSError) as err:
            log.debug("broker store: closing %s: %s", self.where, type(err).__name__)

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await op()
        except (RedisError, OSError, asyncio.TimeoutError) as err:
            self._failed(err)
            raise StoreUnavailable(f"the shared store {self.where} is unavailable ({type(err).__name__})") from None
        if self._down_since is not None:
            log.warning("broker store: %s is back after %.1f s; issuing again", self.where,
                        time.monotonic() - self._down_since)
            self._down_since = None
        return result

    def _failed(self, err: BaseException) -> None:
        self.failures += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.outages += 1
            log.error("broker store: %s is unavailable (%s: %s); refusing requests until it answers again", self.where,
                      type(err).__name__, str(err)[:200])

    def collector(self) -> StoreCollector:
        """A Prometheus collector for this store (register it in the broker's registry)."""
        return StoreCollector(self)


class StoreCollector:
    """``kerb_jupyter_broker_store_up``, ``..._store_failures`` and ``..._store_outages``, read at scrape time."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("kerb_jupyter_broker_store_up", "1 while the shared store answers, 0 in an outage")
        up.add_metric([], 1.0 if self.store.up else 0.0)
        yield up
        failures = CounterMetricFamily("kerb_jupyter_broker_store_failures",
                                       "Store operations that failed (each refused a request)")
        failures.add_metric([], self.store.failures)
        yield failures
        outages = CounterMetricFamily("kerb_jupyter_broker_store_outages", "Periods the store was unavailable")
        outages.add_metric([], self.store.outages)
        yield outages


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _parse(url: str) -> tuple[str, dict[str, Any], str]:
    """(URL for redis-py, extra client arguments, a printable location without credentials). Raises ConfigError."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 6379
    except ValueError:
        raise ConfigError("the store URL is malformed") from None
    if parts.scheme not in ("redis", "rediss") or not host:
        raise ConfigError("the store URL must be redis://host[:port][/db] or rediss://...")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - _OPTIONS)
    if unknown:
        known = ", ".join(sorted(_OPTIONS))
        raise ConfigError(f"unknown option(s) in the store URL: {', '.join(unknown)} (known: {known})")
    kwargs: dict[str, Any] = {}
    if "password_file" in query:
        path = Path(query.pop("password_file"))
        try:
            kwargs["password"] = path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"cannot read the store's password_file {path}: {err.strerror}") from None
    ca = query.get("ssl_ca_certs")
    if ca is not None:
        if parts.scheme != "rediss":
            raise ConfigError("ssl_ca_certs needs a rediss:// store URL")
        if not Path(ca).is_file():
            raise ConfigError(f"the store's CA bundle {ca} is not a readable file")
    netloc = parts.netloc
    where = f"{parts.scheme}://{host}:{port}{parts.path or '/0'}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), "")), kwargs, where
