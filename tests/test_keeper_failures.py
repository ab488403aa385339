"""The keeper never dies: damaged or missing caches, a buggy source, a dead task, someone else's state dir."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest
from helpers import keeper_for

from kerb_jupyter import CacheError, NoTicketError
from kerb_jupyter.core import tickets


@pytest.mark.parametrize("damage", ["empty", "corrupt", "mode", "owner"])
def test_a_damaged_cache_is_never_used_silently(sandbox, cache, damage):
    tickets.acquire_with_keytab(sandbox.principal, sandbox.keytab, cache)
    if damage == "empty":
        cache.write_bytes(b"")
    elif damage == "corrupt":
        cache.write_bytes(b"\x05\x04garbage" * 10)
    elif damage == "mode":
        cache.chmod(0o644)
    else:
        if os.geteuid() != 0:
            pytest.skip("changing a file's owner needs root")
        os.chown(cache, 65534, 65534)
    with pytest.raises(CacheError) as err:
        tickets.read_cache(cache)
    assert str(cache) in str(err.value)
    # The keeper does not trust it either: it replaces it with a fresh ticket of its own.
    keeper = keeper_for(sandbox, cache)
    keeper.step()
    assert keeper.state.state == "valid"
    assert tickets.read_cache(cache).principal == sandbox.principal


def test_missing_cache_says_so(tmp_path):
    with pytest.raises(NoTicketError, match="no ticket cache"):
        tickets.read_cache(tmp_path / "nothing")


class ExplodingSource:
    """A source with a bug: the keeper must report it, keep its task alive and stop cleanly."""

    kind = "exploding"
    can_acquire = True

    def __init__(self) -> None:
        self.calls = 0

    def acquire(self, principal, cache, lifetime, renew_life):
        self.calls += 1
        raise TypeError("expected str, bytes or os.PathLike object, not int")

    def describe(self) -> str:
        return "a source with a bug"


def test_an_unexpected_error_is_an_error_state_not_a_dead_task(sandbox, cache, caplog):
    async def scenario():
        keeper = keeper_for(sandbox, cache, ExplodingSource())
        keeper.start()
        while keeper.state.state != "error":
            await asyncio.sleep(0.02)
        alive = not keeper._task.done()
        again = await keeper.renew_now()  # a manual attempt works, and fails the same way
        await keeper.stop()
        return keeper, alive, again

    with caplog.at_level(logging.ERROR, logger="kerb_jupyter.server.keeper"):
        keeper, alive, again = asyncio.run(scenario())
    assert alive and keeper.source.calls == 2
    assert again.last_error["code"] == "internal_error"
    assert "TypeError: expected str, bytes or os.PathLike object, not int" in again.last_error["message"]
    assert "Traceback" in caplog.text  # the server log keeps the traceback; the status does not
    assert "Traceback" not in json.dumps(keeper.state.as_dict())


def test_stop_succeeds_even_when_the_task_died(sandbox, cache):
    async def scenario():
        keeper = keeper_for(sandbox, cache)

        async def dies():
            raise RuntimeError("boom")

        keeper._task = asyncio.get_running_loop().create_task(dies())
        await asyncio.sleep(0)
        await keeper.stop()
        return keeper

    assert asyncio.run(scenario()).state.state == "stopped"


def test_a_state_directory_owned_by_someone_else_is_an_error_not_a_dead_keeper(sandbox, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    state = tmp_path / "theirs"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)

    async def scenario():
        keeper = keeper_for(sandbox, state / "krb5cc")
        keeper.start()
        while keeper.state.state not in ("error",):
            await asyncio.sleep(0.02)
        alive = not keeper._task.done()
        after = await keeper.renew_now()
        await keeper.stop()  # right after a renewal woke the loop: the stop is not lost (it once was)
        return keeper, alive, after

    keeper, alive, after = asyncio.run(scenario())
    assert alive and after.state == "error"
    assert str(state) in after.last_error["message"] and "uid 65534" in after.last_error["message"]
    assert keeper.state.state == "error"
