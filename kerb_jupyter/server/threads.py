"""Blocking calls awaited from asyncio in daemon threads, so a hung KDC or database never delays the server's exit.

``asyncio.to_thread`` uses the loop's executor, whose worker threads the interpreter joins at exit: a Kerberos
call against a KDC that accepts and never answers (~27 s with MIT's defaults) or a check of a silent database
would keep a server that was told to stop (SIGTERM) alive that long, past a supervisor's patience.

While such a thread runs, the interpreter's switch interval is lowered to ``SWITCH_INTERVAL``: the threads run
Python code (psycopg's connection generator, pykrb5 wrappers, botocore) holding the GIL, and the event loop waits up
to one switch interval (5 ms by default) to get it back. Restored when the last of them ends.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
SWITCH_INTERVAL = 0.0005  # seconds; the event loop's worst wait for the GIL while blocking work runs


class _FastSwitch:
    """A lower ``sys.setswitchinterval`` while at least one blocking call runs; the previous one restored after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._active == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, SWITCH_INTERVAL))
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                sys.setswitchinterval(self._saved)


_fast_switch = _FastSwitch()


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
        finally:
            _fast_switch.leave()
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:
            pass  # the loop has closed: nobody waits for this any more

    _fast_switch.enter()
    try:
        threading.Thread(target=run, name=name, daemon=True).start()
    except BaseException:
        _fast_switch.leave()
        raise
    return await future
