"""Blocking calls awaited from asyncio in daemon threads, so a hung KDC or database never delays the server's exit.

``asyncio.to_thread`` uses the loop's executor, whose worker threads the interpreter joins at exit: a Kerberos
call against a KDC that accepts and never answers (~27 s with MIT's defaults) or a check of a silent database
would keep a server that was told to stop (SIGTERM) alive that long, past a supervisor's patience.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_daemon_thread(fn: Callable[..., T], *args: Any, name: str = "kerb-jupyter") -> T:
    """``await`` ``fn(*args)`` run in a new daemon thread; cancelling the await abandons the thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            result: Any = (True, fn(*args))
        except BaseException as err:  # handed to the awaiting coroutine, never lost in this thread
            result = (False, err)
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:
            pass  # the loop has closed: nobody waits for this any more

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
