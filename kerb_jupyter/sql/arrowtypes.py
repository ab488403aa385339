"""PostgreSQL result columns -> Arrow types: how each column's COPY CSV text is read, converted and named.

Every column gets a ``ColumnPlan``: the Arrow type pyarrow's CSV reader parses its text into, and (for the
types the CSV reader cannot parse) a vectorised conversion from that text (``arrowtext``). Types without a
faithful Arrow equivalent stay text, with a note; a value a typed column cannot hold is an error naming column
and value. ``Decoder`` turns one block of COPY's CSV into those columns; a column holding a value its Arrow type
cannot hold (``infinity``, BC dates, ``24:00:00``, NaN in numeric(p, s)) becomes PostgreSQL's text, with a note.
COPY runs in the session's time zone: ``timestamptz`` (and its arrays) get that zone as their Arrow zone
(``arrow_zone``), and every text (fallbacks, ``tstzrange``, composites) is what psql shows in that session.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from ..core.errors import DatabaseError
from .arrowtext import (
    SECONDS_OFFSET,
    BadValue,
    Convert,
    bytea_array,
    element_converter,
    enum_converter,
    interval_array,
    is_timestamptz,
    list_converter,
    timestamptz_converter,
)
from .pgtext import cell_text

# Built-in OIDs (stable across PostgreSQL versions): name, and what Arrow reads the CSV text as.
SCALARS: dict[int, tuple[str, pa.DataType]] = {
    16: ("bool", pa.bool_()), 20: ("int8", pa.int64()), 21: ("int2", pa.int16()), 23: ("int4", pa.int32()),
    26: ("oid", pa.int64()), 700: ("float4", pa.float32()), 701: ("float8", pa.float64()),
    1082: ("date", pa.date32()), 1083: ("time", pa.time64("us")), 1114: ("timestamp", pa.timestamp("us")),
    1184: ("timestamptz", pa.timestamp("us", "UTC")),
}
TEXTS = {18: "char", 19: "name", 25: "text", 114: "json", 142: "xml", 705: "unknown", 1042: "bpchar",
         1043: "varchar", 2950: "uuid", 3802: "jsonb"}
CONVERTED = {17: "bytea", 1186: "interval", 1700: "numeric"}
ARRAYS = {1000: 16, 1001: 17, 1002: 18, 1003: 19, 1005: 21, 1007: 23, 1009: 25, 1014: 1042, 1015: 1043, 1016: 20,
          1021: 700, 1022: 701, 1028: 26, 1115: 1114, 1182: 1082, 1183: 1083, 1185: 1184, 1187: 1186, 1231: 1700,
          199: 114, 2951: 2950, 3807: 3802}
NUMERIC = 1700


@dataclass(frozen=True)
class PgType:
    """What pg_type says about a type this module does not know by OID."""

    name: str
    kind: str  # pg_type.typtype: b base, e enum, d domain, c composite, r range, ...
    element: int = 0  # arrays: the element type
    base: int = 0  # domains: the underlying type
    labels: tuple[str, ...] = ()  # enums, in their sort order
    category: str = ""  # pg_type.typcategory: A for arrays (point also has a typelem, but is no array)


@dataclass
class ColumnPlan:
    name: str
    type_name: str
    read_as: pa.DataType  # what pyarrow.csv parses the text into
    convert: Convert | None = None  # text -> final Arrow type, per block
    infer: bool = False  # unconstrained numeric: decimal type chosen from the values
    note: str = ""
    element: ColumnPlan | None = None  # arrays: the plan of their elements


def lookup_sql() -> str:
    """One query for every OID not known here: name, kind, element, base type and enum labels."""
    return ("SELECT t.oid::int, t.typname::text, t.typtype::text, t.typelem::int, t.typbasetype::int, "
            "t.typcategory::text, coalesce((SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder) "
            "FROM pg_enum e "
            "WHERE e.enumtypid = t.oid), '{}') FROM pg_type t WHERE t.oid = ANY(%s)")


def unknown_oids(oids: list[int]) -> list[int]:
    return sorted({o for o in oids if o not in SCALARS and o not in TEXTS and o not in CONVERTED and o not in ARRAYS})


def plan_column(name: str, oid: int, typmod: int, types: Mapping[int, PgType]) -> ColumnPlan:
    """How column ``name`` of type ``oid`` (with ``typmod``) becomes Arrow."""
    info = types.get(oid)
    while info is not None and info.kind == "d" and info.base:  # a domain is its base type
        oid, info = info.base, types.get(info.base)
    type_name = _name(oid, types)
    if oid in SCALARS:
        return ColumnPlan(name, type_name, SCALARS[oid][1])
    if oid in TEXTS:
        return ColumnPlan(name, type_name, pa.string())
    if oid == NUMERIC:
        decimal = numeric_type(typmod)
        if decimal is None:
            return ColumnPlan(name, type_name, pa.string(), infer=True)
        if pa.types.is_decimal256(decimal):  # pyarrow's CSV reader parses decimal128 only
            return ColumnPlan(name, type_name, pa.string(), convert=lambda t: cast_decimal(name, t, decimal))
        return ColumnPlan(name, type_name, decimal)
    if oid == 17:
        return ColumnPlan(name, type_name, pa.string(), convert=bytea_array)
    if oid == 1186:
        return ColumnPlan(name, type_name, pa.string(), convert=interval_array)
    if info is not None and info.kind == "e":
        return ColumnPlan(name, type_name, pa.string(), convert=enum_converter(info.labels))
    element = ARRAYS.get(oid) or (info.element if info is not None and info.category == "A" else 0)
    if element:
        inner = plan_column(name, element, typmod, types)
        if inner.infer:  # one decimal type for every block cannot be known in advance: text elements, said so
            return ColumnPlan(name, type_name, pa.string(), convert=array_converter(replace(inner, infer=False)),
                              note=f"column {name!r} is numeric[] without precision: its elements are returned as "
                                   "text (cast it to numeric(p,s)[] for decimals)")
        if not inner.note:
            return ColumnPlan(name, type_name, pa.string(), convert=array_converter(inner), element=inner)
    return ColumnPlan(name, type_name, pa.string(),
                      note=f"column {name!r} has type {type_name}, which has no Arrow mapping here: returned as text")


def _name(oid: int, types: Mapping[int, PgType]) -> str:
    if oid in SCALARS:
        return SCALARS[oid][0]
    known = TEXTS.get(oid) or CONVERTED.get(oid)
    if known:
        return known
    if oid in ARRAYS:
        return "_" + _name(ARRAYS[oid], types)
    return types[oid].name if oid in types else str(oid)


def numeric_type(typmod: int) -> pa.DataType | None:
    """decimal128/256 for numeric(p, s); None for unconstrained numeric (or a scale Arrow cannot hold)."""
    if typmod < 4:
        return None
    precision = ((typmod - 4) >> 16) & 0xFFFF
    scale = (((typmod - 4) & 0x7FF) ^ 1024) - 1024  # 11-bit signed since PostgreSQL 15
    if scale < 0 or scale > precision or precision > 76:
        return None
    return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)


def infer_decimal(name: str, text: pa.Array | pa.ChunkedArray) -> pa.DataType | None:
    """The narrowest decimal holding every value of an unconstrained numeric column, or None (then text).

    None when a value is NaN or +/-Infinity or needs more than 76 digits."""
    valid = pc.drop_null(text)
    if len(valid) == 0:
        return pa.decimal128(38, 0)
    if pc.any(pc.match_substring_regex(valid, "[NI]")).as_py():
        return None
    digits = pc.replace_substring_regex(valid, r"^-", "")
    dot = pc.find_substring(digits, ".")
    length = pc.utf8_length(digits)
    scale = pc.if_else(pc.less(dot, 0), 0, pc.subtract(pc.subtract(length, dot), 1))
    whole = pc.if_else(pc.less(dot, 0), length, dot)
    max_scale = int(pc.max(scale).as_py() or 0)
    max_whole = int(pc.max(whole).as_py() or 0)
    if max_whole + max_scale <= 38:
        return pa.decimal128(38, max_scale)
    if max_whole + max_scale <= 76:
        return pa.decimal256(76, max_scale)
    return None


def cast_decimal(name: str, text: pa.Array | pa.ChunkedArray, target: pa.DataType) -> Any:
    """Cast numeric text to ``target``; a value that does not fit raises BadValue naming it."""
    try:
        return pc.cast(text, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        for value in text.to_pylist():
            if value is None:
                continue
            try:
                pa.array([Decimal(value)], target)
            except (pa.ArrowInvalid, ArithmeticError, ValueError):
                raise BadValue(str(target), value) from None
        raise


def array_converter(element: ColumnPlan) -> Convert:
    """``{1,2,NULL}`` text -> list<element>; one-dimensional arrays (more dimensions: text, see plan_column)."""
    return list_converter(element_converter(element.read_as, element.convert))


# -- timestamptz in the session's time zone ------------------------------------------------------------------------
_POSIX_FIXED = re.compile(r"(?:<[^>]*>|[A-Za-z]{3,})([+-]?)(\d{1,2})(?::(\d\d))?")


def arrow_zone(setting: str) -> str | None:
    """PostgreSQL's TimeZone setting as a time zone name Python, Arrow, pandas and polars all know, or None.

    An IANA name Python's ``zoneinfo`` knows stays itself (the psycopg path's zone); a POSIX zone of whole hours
    without daylight saving (``UTC+3``, ``<-07>+07`` from ``SET TIME ZONE -7``) is its ``Etc/GMT+3`` (same sign:
    three hours behind UTC). Both give the offsets psql prints. Anything else (``<+02:30>-02:30`` from ``SET TIME
    ZONE INTERVAL '+02:30' HOUR TO MINUTE``, which polars cannot take as a zone; POSIX rules with DST) is None."""
    m = _POSIX_FIXED.fullmatch(setting)
    if m is not None and m.group(3) in (None, "00"):
        setting = f"Etc/GMT{'-' if m.group(1) == '-' else '+'}{int(m.group(2))}".replace("GMT+0", "GMT")
    elif m is not None:
        return None
    try:
        zoneinfo.ZoneInfo(setting)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return None
    return setting


def in_zone(plan: ColumnPlan, zone: str) -> ColumnPlan:
    """``plan`` with its timestamptz values (also array elements) in the Arrow time zone ``zone``."""
    if plan.convert is None and is_timestamptz(plan.read_as):
        return replace(plan, read_as=pa.timestamp("us", zone))
    if plan.element is not None:
        element = in_zone(plan.element, zone)
        if element is not plan.element:
            return replace(plan, element=element, convert=array_converter(element))
    return plan


_CSV_ERROR = re.compile(r"column #(\d+): .*?(?:invalid value|The string) '(.*)'", re.S)


class Decoder:
    """CSV block -> one Arrow array per column. ``streaming``: types fixed by the first block; ``fixed``: by a write."""

    def __init__(self, plans: list[ColumnPlan], zone: str = "UTC") -> None:
        """``zone``: the session's TimeZone setting, the zone COPY writes timestamptz text in."""
        tz = arrow_zone(zone)
        self.plans = [in_zone(p, tz or "UTC") for p in plans]
        self.names = [f"c{i}" for i in range(len(plans))]  # result columns may share a name
        self.notes = [p.note for p in plans if p.note]
        if tz is None:
            self.notes += [f"column {p.name!r} ({p.type_name}) is in UTC: the session's time zone {zone!r} is not "
                           "one with a name Python, Arrow and polars know (the instants are right)" for p in self.plans
                           if is_timestamptz((p.element or p).read_as)]
        self.decimals: dict[int, pa.DataType | None] = {}
        self.texts: set[int] = set()  # columns turned text
        self.rows = 0  # rows decoded so far
        self.fixed = False
        self._read = pcsv.ReadOptions(column_names=self.names, use_threads=True)
        self._options()

    def _options(self) -> None:
        text = any(pa.types.is_string(p.read_as) for p in self.plans)
        self._parse = pcsv.ParseOptions(newlines_in_values=text, ignore_empty_lines=False)  # one NULL column
        self._convert = pcsv.ConvertOptions(
            column_types=dict(zip(self.names, (p.read_as for p in self.plans))), null_values=[""],
            strings_can_be_null=True, quoted_strings_can_be_null=False, true_values=["t"], false_values=["f"])

    def decode(self, block: bytearray | bytes, streaming: bool = False) -> list[pa.ChunkedArray]:
        """Raises DatabaseError naming column, row and value when one does not fit a fixed Arrow type."""
        if not self.plans:
            return []
        while True:
            try:
                table = self._read_csv(block)
                break
            except pa.ArrowInvalid as err:
                m = _CSV_ERROR.search(str(err))
                i = int(m.group(1)) if m else len(self.plans)
                if m is None or i >= len(self.plans) or pa.types.is_string(self.plans[i].read_as):
                    raise DatabaseError(f"Arrow could not read the result: {err}", code="arrow_conversion") from None
                if is_timestamptz(target := self.plans[i].read_as) and SECONDS_OFFSET.search(m.group(2)):
                    self.plans[i] = replace(self.plans[i], read_as=pa.string(),  # same Arrow type, parsed here
                                            convert=timestamptz_converter(target))
                    self._options()
                    continue
                self._to_text(i, m.group(2), block)
        out = []
        for i, (plan, column) in enumerate(zip(self.plans, table.columns)):
            try:
                if plan.convert is not None:
                    column = self._converted(plan, column)
                elif plan.infer and streaming:
                    column = self._decimal(i, column, first=i not in self.decimals)
            except BadValue as bad:
                self._to_text(i, bad.value, block)
            out.append(column)
        self.rows += table.num_rows
        return out

    def _to_text(self, i: int, value: str, block: bytearray | bytes) -> None:
        """Column ``i`` holds ``value``, which its Arrow type cannot: from now on it is PostgreSQL's text, with a
        note; unless ``fixed``: then an error naming column, row and value."""
        plan, shown = self.plans[i], value if len(value) <= 60 else value[:59] + "…"
        if self.fixed:
            only = pcsv.ConvertOptions(column_types={self.names[i]: pa.string()}, include_columns=[self.names[i]],
                                       null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False)
            whole = pcsv.ReadOptions(column_names=self.names, use_threads=True, block_size=len(block) + 1)
            column = pcsv.read_csv(pa.py_buffer(block), whole, self._parse, only).column(0)
            row = pc.index(column, value).as_py()
            if row < 0:  # an element of an array
                row = pc.index(pc.match_substring(column, value), True).as_py()
            raise DatabaseError(
                f"column {plan.name!r}, row {self.rows + row + 1}: the value {shown!r} does not fit Arrow's "
                f"{plan.type_name}, the type earlier rows were written with; cast or filter it in SQL (for example "
                "::text), or export to .csv", code="arrow_conversion")
        self.texts.add(i)
        self.plans[i] = ColumnPlan(plan.name, plan.type_name, pa.string())
        self.decimals.pop(i, None)
        self.notes.append(f"column {plan.name!r} ({plan.type_name}) holds {shown!r}, which Arrow cannot: "
                          "the whole column is returned as PostgreSQL's text")
        self._options()

    def _read_csv(self, block: bytearray | bytes) -> pa.Table:
        try:
            return pcsv.read_csv(pa.py_buffer(block), self._read, self._parse, self._convert)
        except pa.ArrowInvalid as err:
            if "straddl" not in str(err):
                raise
        # A row longer than pyarrow's 1 MB parse block: this block in one piece (one thread).
        whole = pcsv.ReadOptions(column_names=self.names, use_threads=True, block_size=len(block) + 1)
        return pcsv.read_csv(pa.py_buffer(block), whole, self._parse, self._convert)

    def _converted(self, plan: ColumnPlan, column: pa.ChunkedArray) -> pa.ChunkedArray:
        assert plan.convert is not None
        try:
            chunks = [plan.convert(chunk) for chunk in column.chunks]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:  # an array element (infinity in date[])
            m = re.search(r"'(.*)'", str(err), re.S)
            raise BadValue(plan.type_name, m.group(1) if m else str(err)) from None
        return pa.chunked_array(chunks, chunks[0].type if chunks else plan.convert(pa.array([], pa.string())).type)

    def _decimal(self, i: int, column: pa.ChunkedArray, first: bool) -> pa.ChunkedArray:
        plan = self.plans[i]
        if first:
            self.decimals[i] = target = infer_decimal(plan.name, column)
            if target is None:
                self.notes.append(f"column {plan.name!r} (numeric) has NaN, Infinity or more than 76 digits: "
                                  "returned as text")
        target = self.decimals[i]
        return column if target is None else cast_decimal(plan.name, column, target)

    def finish_column(self, i: int, chunks: list[pa.ChunkedArray]) -> pa.ChunkedArray:
        """All the blocks of column ``i`` as one column; unconstrained numeric gets its decimal type here."""
        plan = self.plans[i]
        if not chunks:
            empty = pa.array([], plan.read_as)
            if plan.convert is not None:
                return pa.chunked_array([], plan.convert(pa.array([], pa.string())).type)
            return pa.chunked_array([], pa.decimal128(38, 0) if plan.infer else empty.type)
        if i in self.texts:  # blocks decoded before the column turned text: as COPY wrote them (pgtext's rules)
            chunks = [c if pa.types.is_string(c.type) else _as_text(c) for c in chunks]
        column = pa.chunked_array([c for part in chunks for c in part.chunks], chunks[0].type)
        if plan.infer and i not in self.decimals:
            return self._decimal(i, column, first=True)
        return column


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    single = {pa.float32(): 700, pa.list_(pa.float32()): 1021}.get(column.type, 0)  # float4's shortest digits
    text = [None if v is None else cell_text(v, single) for v in column.to_pylist()]
    return pa.chunked_array([pa.array(text, pa.string())], pa.string())
