"""The broker's short-lived shared state: replay refusal, rate counters, a small cache (memory or Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from ..core.errors import KerbJupyterError


class StoreUnavailable(KerbJupyterError):
    """The shared store cannot be reached: the broker answers 503 with this code."""

    code = "store_unavailable"


class Store(Protocol):
    async def first_use(self, key: str, ttl: float) -> bool:
        """Atomically record ``key`` for ``ttl`` seconds; False if it was seen before (a replay)."""
        ...

    async def hit(self, key: str, limit: int, window: float) -> bool:
        """Count one event for ``key``; False when that makes more than ``limit`` in ``window`` seconds."""
        ...

    async def get(self, key: str) -> str | None:
        """A cached value, or None when absent or expired."""
        ...

    async def put(self, key: str, value: str, ttl: float) -> None:
        """Cache ``value`` under ``key`` for ``ttl`` seconds."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be used."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


class MemoryStore:
    """One process's store: a dict with expiry times, swept as it grows; the clock is injectable for tests."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, sweep_every: int = 1024) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._values: dict[str, str] = {}
        self._hits: dict[str, list[float]] = {}
        self._lock = asyncio.Lock()
        self._sweep_every = sweep_every
        self._ops = 0

    def _sweep(self, now: float) -> None:
        self._ops += 1
        if self._ops % self._sweep_every:
            return
        for key in [k for k, t in self._expiry.items() if t <= now]:
            self._expiry.pop(key, None)
            self._values.pop(key, None)
        for key in [k for k, times in self._hits.items() if not times or times[-1] <= now]:
            del self._hits[key]

    async def first_use(self, key: str, ttl: float) -> bool:
        async with self._lock:
            now = self._clock()
            self._sweep(now)
            marker = "seen:" + key
            if self._expiry.get(marker, 0.0) > now:
                return False
            self._expiry[marker] = now + ttl
            return True

    async def hit(self, key: str, limit: int, window: float) -> bool:
        async with self._lock:
            now = self._clock()
            self._sweep(now)
            # Each entry is the time an event stops counting: a sliding window.
            times = [t for t in self._hits.get(key, []) if t > now]
            times.append(now + window)
            self._hits[key] = times
            return len(times) <= limit

    async def get(self, key: str) -> str | None:
        async with self._lock:
            marker = "val:" + key
            if self._expiry.get(marker, 0.0) <= self._clock():
                return None
            return self._values.get(marker)

    async def put(self, key: str, value: str, ttl: float) -> None:
        async with self._lock:
            now = self._clock()
            self._sweep(now)
            marker = "val:" + key
            self._values[marker] = value
            self._expiry[marker] = now + ttl

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        async with self._lock:
            self._expiry.clear()
            self._values.clear()
            self._hits.clear()


__all__ = ["MemoryStore", "Store", "StoreUnavailable"]
