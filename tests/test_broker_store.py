"""The broker's in-memory store: replay refusal, sliding-window limits, the short cache, make_store."""

from __future__ import annotations

import asyncio

import pytest

from kerb_jupyter.broker.store import MemoryStore, StoreUnavailable
from kerb_jupyter.broker.stores import make_store
from kerb_jupyter.core.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_use_refuses_a_replay_until_the_ttl_passes() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, sweep_every=1)

    async def run() -> list[bool]:
        seen = [await store.first_use("sig-1", 300), await store.first_use("sig-1", 300)]
        seen.append(await store.first_use("sig-2", 300))
        clock.now += 301
        seen.append(await store.first_use("sig-1", 300))
        return seen

    assert asyncio.run(run()) == [True, False, True, True]


def test_first_use_is_atomic_under_concurrency() -> None:
    store = MemoryStore()

    async def run() -> list[bool]:
        return list(await asyncio.gather(*(store.first_use("same", 60) for _ in range(50))))

    assert sorted(asyncio.run(run())) == [False] * 49 + [True]


def test_hit_counts_in_a_sliding_window() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock, sweep_every=1)

    async def run() -> list[bool]:
        out = [await store.hit("alice", 2, 10) for _ in range(3)]
        clock.now += 5
        out.append(await store.hit("bob", 2, 10))  # other keys are independent
        clock.now += 6  # the first three have left the window
        out.append(await store.hit("alice", 2, 10))
        return out

    assert asyncio.run(run()) == [True, True, False, True, True]


def test_get_put_expire_and_close() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)

    async def run() -> list[str | None]:
        await store.ping()
        await store.put("groups:alice", "a;b", 30)
        out = [await store.get("groups:alice"), await store.get("groups:bob")]
        clock.now += 31
        out.append(await store.get("groups:alice"))
        await store.put("k", "v", 30)
        await store.close()
        out.append(await store.get("k"))
        return out

    assert asyncio.run(run()) == ["a;b", None, None, None]


def test_make_store() -> None:
    assert isinstance(make_store(None), MemoryStore)
    assert isinstance(make_store("memory"), MemoryStore)
    with pytest.raises(ConfigError, match="memory"):
        make_store("memcached://x")
    assert StoreUnavailable("down").code == "store_unavailable"
