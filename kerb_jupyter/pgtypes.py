"""PostgreSQL types on our connections: type names as psql shows them (cached), and the loaders that keep
every value either an exact Python value or PostgreSQL's own text for it.

Results are fetched in text format. Only the types in ``pgtext.PYTHON_TYPES`` become Python objects (with
psycopg's C loaders); every other type (enums, money, xml, arrays, json, intervals, user types...) stays the
server's text, which is exactly what psql prints. A value the fast loaders cannot hold (``infinity``, BC
dates, years after 9999, ``24:00:00``) makes :func:`load_rows_safely` reload the result with loaders that
keep that value's text instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import AdaptersMap, Loader, Transformer
from psycopg.types.string import TextLoader

from .pgtext import ARRAY_ELEMENTS, FALLIBLE_OIDS, PYTHON_TYPES

__all__ = [
    "column_type_names", "load_rows_safely", "prepare", "safe_adapters", "type_name", "type_names",
    "use_safe_loaders",
]

TEXT = pq.Format.TEXT
FIRST_USER_OID = 16384  # FirstNormalObjectId: built-in objects have smaller OIDs, stable across versions

_NAMES: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], str]] = weakref.WeakKeyDictionary()
_SAFE: weakref.WeakKeyDictionary[Any, AdaptersMap] = weakref.WeakKeyDictionary()

_SEED_SQL = "SELECT oid::int8, -1, format_type(oid, -1) FROM pg_type WHERE oid < %s"
_LOOKUP_SQL = (
    "SELECT t.o, t.m, format_type(t.o::oid, t.m) FROM unnest(%s::int8[], %s::int4[]) AS t(o, m)"
)


def prepare(conn: psycopg.Connection[Any]) -> None:
    """Set up ``conn`` once: text loaders for every type psycopg would turn into something else than its exact
    value, and the names of the built-in types (one query, only outside a transaction)."""
    if conn in _SAFE:
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
    _SAFE[conn] = _make_safe(adapters)
    if conn.info.transaction_status == pq.TransactionStatus.IDLE:
        _seed(conn)


def _seed(conn: psycopg.Connection[Any]) -> None:
    names = _NAMES.setdefault(conn, {})
    with conn.cursor() as cur:
        for oid, mod, name in cur.execute(_SEED_SQL, (FIRST_USER_OID,), prepare=False):
            names[(int(oid), int(mod))] = name


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
            cur.execute(_LOOKUP_SQL, ([o for o, _ in missing], [m for _, m in missing]), prepare=False)
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
        except (psycopg.DataError, ValueError, OverflowError):
            return bytes(data).decode(self._encoding)


def _make_safe(adapters: AdaptersMap) -> AdaptersMap:
    safe = AdaptersMap(adapters)
    for oid in FALLIBLE_OIDS:
        base = adapters.get_loader(oid, TEXT)
        if base is not None:
            safe.register_loader(oid, type(f"KeepText_{oid}", (_KeepText,), {"base": base, "format": TEXT}))
    return safe


def safe_adapters(conn: psycopg.Connection[Any]) -> AdaptersMap:
    """The connection's loaders with the date/time ones keeping out-of-range values as text."""
    prepare(conn)
    return _SAFE[conn]


class _Context:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.connection = conn
        self.adapters = safe_adapters(conn)


def use_safe_loaders(cur: psycopg.Cursor[Any]) -> None:
    """Make ``cur`` load out-of-range date/time values as text (for small results: costs a Python call per
    date/time value)."""
    safe = safe_adapters(cur.connection)
    for oid in FALLIBLE_OIDS:
        loader = safe.get_loader(oid, TEXT)
        if loader is not None:
            cur.adapters.register_loader(oid, loader)


def load_rows_safely(
    conn: psycopg.Connection[Any], result: pq.abc.PGresult, start: int, stop: int
) -> list[tuple[Any, ...]]:
    """Rows ``start..stop`` of ``result``, out-of-range date/time values kept as PostgreSQL's text."""
    tx = Transformer(_Context(conn))
    tx.set_pgresult(result)
    return tx.load_rows(start, stop, tuple)
