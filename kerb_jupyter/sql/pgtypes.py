"""PostgreSQL types on our connections: type names as psql shows them (cached), and the loaders that keep
every value either an exact Python value or PostgreSQL's own text for it.

Results are fetched in text format. Only the types in ``pgtext.PYTHON_TYPES`` become Python objects (with
psycopg's C loaders); every other type (enums, money, xml, json, intervals, user types...) stays the server's
text, which is exactly what psql prints. The connection's date/time loaders keep a value Python cannot hold
(``infinity``, BC dates, years after 9999, ``24:00:00``) as its text; they cost a Python call per value, so
:func:`load_rows` loads big results with psycopg's plain C loaders and falls back to them only for a chunk
that needs it.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import weakref
from collections.abc import Iterable, Sequence
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from psycopg import pq
from psycopg.adapt import AdaptersMap, Loader, Transformer
from psycopg.types.string import TextLoader

from ..core.tagging import tag_statement
from .pgtext import ARRAY_ELEMENTS, FALLIBLE_OIDS, PYTHON_TYPES, TIME, TIMESTAMPTZ

__all__ = ["column_type_names", "load_rows", "prepare", "type_name", "type_names"]

TEXT = pq.Format.TEXT
FIRST_USER_OID = 16384  # FirstNormalObjectId: built-in objects have smaller OIDs, stable across versions

# What psycopg's loaders raise for a value Python cannot hold, or a DateStyle they cannot parse.
_CANNOT_HOLD = (psycopg.DataError, ValueError, OverflowError, NotImplementedError)

_NAMES: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], str]] = weakref.WeakKeyDictionary()
_FAST: weakref.WeakKeyDictionary[Any, AdaptersMap] = weakref.WeakKeyDictionary()
_COMMENT: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()  # the tag of the lookups

_SEED_SQL = "SELECT oid::int8, -1, format_type(oid, -1) FROM pg_type WHERE oid < %s"
_LOOKUP_SQL = (
    "SELECT t.o, t.m, format_type(t.o::oid, t.m) FROM unnest(%s::int8[], %s::int4[]) AS t(o, m)"
)


def prepare(conn: psycopg.Connection[Any], comment: str | None = None) -> None:
    """Set up ``conn`` once: text loaders for every type psycopg would turn into something else than its exact
    value, and the names of the built-in types (one query, only outside a transaction). ``comment``, when
    given, is the sqlcommenter tag put on the type-name queries made on ``conn`` from then on."""
    if comment is not None:
        _COMMENT[conn] = comment
    if conn in _FAST:
        return
    adapters = conn.adapters
    for info in adapters.types:
        for oid in (info.oid, info.array_oid):
            if oid and oid not in PYTHON_TYPES:
                adapters.register_loader(oid, TextLoader)
    adapters.register_loader(0, TextLoader)  # types psycopg does not know (enums, composites, domains...)
    for oid in ARRAY_ELEMENTS:
        base = adapters.get_loader(oid, TEXT)
        if base is not None:
            adapters.register_loader(oid, type(f"Bounded_{oid}", (_Bounded,), {"base": base, "format": TEXT}))
    _FAST[conn] = AdaptersMap(adapters)  # before the wrappers below: psycopg's C date/time loaders
    for oid in FALLIBLE_OIDS:
        base = adapters.get_loader(oid, TEXT)
        if base is not None:
            keep = {TIMESTAMPTZ: _KeepTimestamptz, TIME: _KeepText}.get(oid, _KeepDateText)
            adapters.register_loader(oid, type(f"KeepText_{oid}", (keep,), {"base": base, "format": TEXT}))
    if conn.info.transaction_status == pq.TransactionStatus.IDLE:
        _seed(conn)


def _seed(conn: psycopg.Connection[Any]) -> None:
    names = _NAMES.setdefault(conn, {})
    with conn.cursor() as cur:
        for oid, mod, name in cur.execute(_tagged(conn, _SEED_SQL), (FIRST_USER_OID,), prepare=False):
            names[(int(oid), int(mod))] = name


def _tagged(conn: psycopg.Connection[Any], sql: str) -> Any:
    return tag_statement(sql, _COMMENT.get(conn, ""), True)


def type_names(conn: psycopg.Connection[Any], oids: Iterable[int]) -> dict[int, str]:
    """The names of types ``oids`` as ``format_type`` (and psql) write them, e.g. ``{16394: 'mood',
    1184: 'timestamp with time zone'}``; cached per connection, one query for the ones not seen yet.

    Not while a result is being streamed on ``conn`` (the lookup is a query). Raises psycopg.Error."""
    wanted = list(dict.fromkeys(oids))
    names = column_type_names(conn, [(oid, -1) for oid in wanted])
    return dict(zip(wanted, names))


def column_type_names(conn: psycopg.Connection[Any], types: Sequence[tuple[int, int]]) -> list[str]:
    """Names for ``(oid, typmod)`` pairs of a result's columns, with modifiers: ``numeric(12,2)``,
    ``character varying(20)``. Cached per connection; raises psycopg.Error."""
    names = _NAMES.setdefault(conn, {})
    missing = [t for t in dict.fromkeys(types) if t not in names]
    if missing:
        with conn.cursor() as cur:
            cur.execute(_tagged(conn, _LOOKUP_SQL), ([o for o, _ in missing], [m for _, m in missing]), prepare=False)
            for oid, mod, name in cur:
                names[(int(oid), int(mod))] = name if name is not None else str(oid)
    return [names.get(t, str(t[0])) for t in types]


def type_name(conn: psycopg.Connection[Any], oid: int, typmod: int = -1) -> str:
    """One type's name (see :func:`column_type_names`)."""
    return column_type_names(conn, [(oid, typmod)])[0]


class _Wrapper(Loader):
    """Wraps psycopg's (C) loader ``base`` of a type; subclasses decide when a value stays text."""

    base: type[Loader]

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._load = self.base(oid, context).load
        conn = self.connection
        self._encoding = conn.info.encoding if conn is not None else "utf-8"


class _Bounded(_Wrapper):
    """An array loader that keeps an array with explicit bounds (``[0:1]={1,2}``) as text: a list loses them."""

    def load(self, data: Any) -> Any:
        if bytes(data[:1]) == b"[":
            return bytes(data).decode(self._encoding)
        return self._load(data)


class _KeepText(_Wrapper):
    """For a type whose values may not fit Python (dates...): such a value stays PostgreSQL's text."""

    def load(self, data: Any) -> Any:
        try:
            return self._load(data)
        except _CANNOT_HOLD:
            return bytes(data).decode(self._encoding)


def _as_text(data: Any) -> Any:
    raise ValueError("kept as text")


class _KeepDateText(_KeepText):
    """Dates and timestamps: psycopg parses a non-ISO DateStyle (``11/22/2026``, ``22.11.2026``) but the
    table would then show ISO; psql shows the session's style, so with one every value stays its text."""

    def __init__(self, oid: int, context: Any = None) -> None:
        conn = context.connection if context is not None else None
        if conn is not None and not iso_datestyle(conn):
            self._text_only(oid, context, _as_text)
        else:
            self._parsed(oid, context, conn)

    def _parsed(self, oid: int, context: Any, conn: Any) -> None:
        super().__init__(oid, context)

    def _text_only(self, oid: int, context: Any, load: Any) -> None:
        Loader.__init__(self, oid, context)
        self._load, self._encoding = load, context.connection.info.encoding


class _KeepTimestamptz(_KeepDateText):
    """psycopg puts timestamptz values in the session's time zone, or in UTC with a warning when Python does
    not know that zone (``SET TIME ZONE INTERVAL '+02:30'``, POSIX rules): then each value keeps the offset
    PostgreSQL printed for it, as psql shows it."""

    def _parsed(self, oid: int, context: Any, conn: Any) -> None:
        if conn is None or session_zone_known(conn):
            _KeepText.__init__(self, oid, context)
        else:
            self._text_only(oid, context, _fixed_offset_timestamp)


_TIMESTAMP = re.compile(
    rb"(\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?")


def _fixed_offset_timestamp(data: Any) -> dt.datetime:
    """``2026-01-01 02:30:00+02:30`` as an aware datetime with that fixed offset; ValueError otherwise."""
    m = _TIMESTAMP.fullmatch(bytes(data))
    if m is None:
        raise ValueError("not an ISO timestamp Python can hold")
    y, mo, d, h, mi, sec, frac, sign, oh, om, osec = m.groups()
    offset = dt.timedelta(hours=int(oh), minutes=int(om or 0), seconds=int(osec or 0))
    zone = dt.timezone(-offset if sign == b"-" else offset)
    micro = int((frac or b"0").ljust(6, b"0"))
    return dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec), micro, tzinfo=zone)


def iso_datestyle(conn: psycopg.Connection[Any]) -> bool:
    """Whether the session's DateStyle is ISO (the default), the one style shown as Python's dates are."""
    return (conn.pgconn.parameter_status(b"DateStyle") or b"ISO").startswith(b"ISO")


def session_zone_known(conn: psycopg.Connection[Any]) -> bool:
    """Whether Python's zoneinfo knows the session's TimeZone (psycopg uses UTC, and warns, when not)."""
    return _zone_known(conn.pgconn.parameter_status(b"TimeZone") or b"UTC")


@functools.lru_cache(maxsize=64)
def _zone_known(name: bytes) -> bool:
    try:
        ZoneInfo(name.decode())
    except (KeyError, OSError, ValueError):
        return False
    return True


class _Context:
    def __init__(self, conn: psycopg.Connection[Any], adapters: AdaptersMap) -> None:
        self.connection = conn
        self.adapters = adapters


def load_rows(
    conn: psycopg.Connection[Any], result: pq.abc.PGresult, start: int, stop: int
) -> list[tuple[Any, ...]]:
    """Rows ``start..stop`` of ``result`` (from a text-format cursor on ``conn``): with psycopg's C loaders,
    or, if a value does not fit them, with the connection's, which keep that value's text."""
    prepare(conn)
    if not (iso_datestyle(conn) and session_zone_known(conn)):  # the C loaders would show something else
        return _load(conn, conn.adapters, result, start, stop)
    tx = Transformer(_Context(conn, _FAST[conn]))
    tx.set_pgresult(result)
    try:
        return tx.load_rows(start, stop, tuple)
    except _CANNOT_HOLD:
        return _load(conn, conn.adapters, result, start, stop)


def _load(
    conn: psycopg.Connection[Any], adapters: AdaptersMap, result: pq.abc.PGresult, start: int, stop: int
) -> list[tuple[Any, ...]]:
    tx = Transformer(_Context(conn, adapters))
    tx.set_pgresult(result)
    return tx.load_rows(start, stop, tuple)
