"""The live "running on CLUSTER for N s" line a long query shows in the notebook (IPython display, imported lazily)."""

from __future__ import annotations

import html
import threading
import time
from typing import Any


class Progress:
    """Shows "running on CLUSTER for N s" (updated each second) once a query has run ``after`` seconds.

    One long-lived daemon thread per magics instance: a fast query costs two Event calls, not a thread start.
    """

    def __init__(self, after: float = 1.0) -> None:
        self.after = after
        self._cluster = ""
        self._started = 0.0
        self._busy = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._handle: Any = None
        self._thread: threading.Thread | None = None

    def running(self, cluster: str) -> Progress:
        """``with progress.running(cluster):`` around a query."""
        self._cluster = cluster
        return self

    def __enter__(self) -> None:
        if self.after <= 0:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="kerbsql-progress", daemon=True)
            self._thread.start()
        self._started = time.monotonic()
        self._done.clear()
        self._busy.set()

    def __exit__(self, *exc: object) -> None:
        if self.after <= 0 or self._thread is None:
            return
        self._busy.clear()
        self._done.set()
        if self._handle is not None:
            with self._lock:  # wait for a tick in progress, then clear what it showed
                if self._handle is not None:
                    from IPython.display import HTML

                    self._handle.update(HTML(""))
                    self._handle = None

    def _watch(self) -> None:
        from IPython.display import HTML, display

        while True:
            self._busy.wait()
            if self._done.wait(self.after):
                continue
            while not self._done.is_set():
                with self._lock:
                    if self._done.is_set():
                        break
                    took = time.monotonic() - self._started
                    page = HTML(f"<small class='kerbsql-progress'>⏳ running on {html.escape(self._cluster)} for "
                                f"{took:.0f} s (interrupt the kernel to cancel)</small>")
                    if self._handle is None:
                        self._handle = display(page, display_id=True)
                    else:
                        self._handle.update(page)
                self._done.wait(1.0)
