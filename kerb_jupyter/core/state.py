"""The shared state between server and kernels: where the cache is, the keeper's state.json, their summary.

The FILE cache is the contract: the server's keeper writes it and state.json, kernels read both directly (no REST
call: kernels have no token). Used by the SQL connections, ``%kerbstatus``, ``kerb-jupyter status`` and the doctor.
"""

from __future__ import annotations

import functools
import html
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from . import tickets
from .config import Settings
from .errors import KerbJupyterError, NoTicketError
from .grants import parse_refused


def cache_path(settings: Settings | None = None) -> Path:
    """The shared cache: KRB5CCNAME (FILE: only) as exported by the server, else the configured state_dir's."""
    name = os.environ.get("KRB5CCNAME", "")
    if name.startswith("FILE:") or (name and ":" not in name):
        return _path(name.removeprefix("FILE:"))
    if not name and settings is not None:
        return settings.cache_path
    raise NoTicketError(
        f"KRB5CCNAME is {name!r}, not a FILE: cache; kerb_jupyter shares tickets through a FILE cache. Start "
        "Jupyter with the kerb_jupyter server extension (it exports KRB5CCNAME to kernels), or unset KRB5CCNAME"
    )


_STATE_MEMO: dict[Path, tuple[tuple[int, ...], dict[str, Any] | None]] = {}


@functools.lru_cache(maxsize=16)
def _path(text: str) -> Path:
    return Path(text)


def keeper_state(settings: Settings) -> dict[str, Any] | None:
    """The server keeper's last snapshot (state.json next to the cache), if there is one (re-read on change)."""
    path = settings.state_path
    try:
        st = path.stat()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        memo = _STATE_MEMO.get(path)
        if memo is not None and memo[0] == key:
            return memo[1]
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    doc = doc if isinstance(doc, dict) else None
    _STATE_MEMO[path] = (key, doc)
    return doc


@dataclass
class CredentialStatus:
    cache: str | None
    ticket: tickets.TicketInfo | None
    keeper: dict[str, Any] | None
    error: KerbJupyterError | None

    @property
    def colour(self) -> str:
        if self.ticket is None:
            return "red"
        keeper = self.keeper or {}
        if keeper.get("state") in ("retrying", "error") or keeper.get("refused") or self.ticket.remaining() < 900:
            return "amber"
        return "green"

    def lines(self) -> list[str]:
        out = []
        if self.ticket is not None:
            left = self.ticket.remaining()
            out.append(f"{self.ticket.principal}: ticket valid for {_duration(left)} "
                       f"(until {_clock(self.ticket.endtime)}, renewable until {_clock(self.ticket.renew_till)})")
        else:
            out.append(f"no valid ticket: {self.error}")
        k = self.keeper
        if k:
            who = k.get("identity") or {}
            if who.get("name"):
                trust = "enforced by AWS" if who.get("trusted") else "claimed"
                out.append(f"identity: {who['name']} (from {who.get('source')}, {trust})")
            out.extend(_broker_lines(k))
            out.append(f"keeper: {k.get('state')}, last renewal {_clock(k.get('last_renewal'))}, "
                       f"next {_clock(k.get('next_attempt'))}")
            if k.get("last_error"):
                out.append(f"last error: {k['last_error'].get('message')}")
        else:
            out.append("keeper: no state file (is the kerb_jupyter server extension running?)")
        out.append(f"cache: {self.cache}")
        return out

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        colours = {"green": "#1a7f37", "amber": "#b76e00", "red": "#cf222e"}
        rows = "".join(f"<div>{html.escape(line)}</div>" for line in self.lines())
        return (f"<div class='kerbstatus' data-colour='{self.colour}' style='border-left:6px solid "
                f"{colours[self.colour]};padding:4px 10px'>{rows}</div>")


def _broker_lines(keeper: dict[str, Any]) -> list[str]:
    """The broker's last answer: the service tickets granted, then each refused cluster with the broker's reason."""
    out = []
    granted = keeper.get("granted")
    if isinstance(granted, dict) and granted:
        out.append("granted by the broker: " + ", ".join(
            f"{spn} until {_clock(end) if isinstance(end, int | float) else '?'}"
            for spn, end in sorted(granted.items())))
    for name, refusal in sorted(parse_refused(keeper.get("refused")).items()):
        out.append(f"refused by the broker: {name}: {refusal['message']} ({refusal['reason']})")
    return out


def credential_status(settings: Settings) -> CredentialStatus:
    ticket, error, cache = None, None, None
    try:
        path = cache_path(settings)
        cache = str(path)
        ticket = tickets.read_cache(path)
    except KerbJupyterError as err:
        error = err
    return CredentialStatus(cache, ticket, keeper_state(settings), error)


def _clock(ts: float | None, now: float | None = None) -> str:
    """A moment in the user's time zone, named; with its date unless it is today."""
    if not ts:
        return "—"
    when = datetime.fromtimestamp(ts).astimezone()
    today = datetime.fromtimestamp(time.time() if now is None else now).astimezone().date()
    return when.strftime("%H:%M:%S %Z" if when.date() == today else "%Y-%m-%d %H:%M:%S %Z")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h {rem // 60:02d}m" if h else f"{rem // 60}m {rem % 60:02d}s"
