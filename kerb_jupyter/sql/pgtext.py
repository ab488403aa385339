"""psql's text for the values of a result, and the pandas column each PostgreSQL type becomes (no psycopg)."""

from __future__ import annotations

import datetime as dt
import math
import struct
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

BOOL, BYTEA, INT8, INT2, INT4, TEXT, OID = 16, 17, 20, 21, 23, 25, 26
NAME, FLOAT4, FLOAT8, BPCHAR, VARCHAR = 19, 700, 701, 1042, 1043
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, NUMERIC, UUID = 1082, 1083, 1114, 1184, 1700, 2950

# The only types loaded as Python objects, each one exact; every other type is PostgreSQL's text.
PYTHON_TYPES = {
    BOOL: "bool", BYTEA: "bytes", INT2: "int", INT4: "int", INT8: "int", OID: "int",
    FLOAT4: "float", FLOAT8: "float", NUMERIC: "Decimal", TEXT: "str", VARCHAR: "str", BPCHAR: "str",
    NAME: "str", DATE: "datetime.date", TIME: "datetime.time", TIMESTAMP: "datetime.datetime",
    TIMESTAMPTZ: "datetime.datetime (aware, session time zone)", UUID: "uuid.UUID",
}
FALLIBLE_OIDS = (DATE, TIME, TIMESTAMP, TIMESTAMPTZ)  # values outside Python's range stay text
# Arrays of those types (built-in OIDs, fixed) become lists, unless their lower bound is not 1 ('[0:1]={..}').
ARRAY_ELEMENTS = {
    1000: BOOL, 1001: BYTEA, 1005: INT2, 1007: INT4, 1016: INT8, 1028: OID, 1021: FLOAT4, 1022: FLOAT8,
    1231: NUMERIC, 1009: TEXT, 1015: VARCHAR, 1014: BPCHAR, 1003: NAME, 1182: DATE, 1183: TIME,
    1115: TIMESTAMP, 1185: TIMESTAMPTZ, 2951: UUID,
}
PYTHON_TYPES.update({oid: f"list of {PYTHON_TYPES[elem]}" for oid, elem in ARRAY_ELEMENTS.items()})

# pandas dtype of each column (the README's table); types not listed are object columns of str.
PANDAS_DTYPES = {INT2: "Int16", INT4: "Int32", INT8: "Int64", OID: "Int64", FLOAT4: "Float64",
                 FLOAT8: "Float64", BOOL: "boolean", TIMESTAMP: "datetime64[us]",
                 TIMESTAMPTZ: "datetime64[us, <session time zone>]"}


def cell_text(value: Any, oid: int = 0) -> str:
    """What ``psql -At`` prints for ``value`` (of a column of type ``oid``), NULL shown as ``NULL``."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, float):
        return float_text(value, single=oid == FLOAT4)
    if isinstance(value, Decimal):
        return numeric_text(value)
    if isinstance(value, dt.datetime):
        return timestamp_text(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dt.time):
        return _clock(value.hour, value.minute, value.second, value.microsecond)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, list):
        return array_text(value, ARRAY_ELEMENTS.get(oid, 0))
    return str(value)


_ARRAY_SPECIAL = frozenset('{},"\\ \t\n\r\v\f')


def array_text(items: list[Any], element: int) -> str:
    """PostgreSQL's array_out: ``{1,NULL,"a b"}``, nested braces for more dimensions."""
    parts = []
    for item in items:
        if isinstance(item, list):
            parts.append(array_text(item, element))
        elif item is None:
            parts.append("NULL")
        else:
            text = cell_text(item, element)
            if not text or text.upper() == "NULL" or any(ch in _ARRAY_SPECIAL for ch in text):
                text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
            parts.append(text)
    return "{" + ",".join(parts) + "}"


def numeric_text(value: Decimal) -> str:
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "-Infinity" if value < 0 else "Infinity"
    return format(value, "f")


def float_text(value: float, single: bool = False) -> str:
    """PostgreSQL's float4/float8 output (shortest exact digits, extra_float_digits >= 1, the default)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    sign, digits, exp = Decimal(_shortest32(value) if single else repr(value)).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    point = len(digits) + int(exp)  # decimal exponent of the first digit is point - 1
    lead = point - 1
    minus = "-" if sign else ""
    if -4 <= lead < (6 if single else 15):
        if point <= 0:
            return f"{minus}0.{'0' * -point}{text}"
        if point >= len(text):
            return f"{minus}{text}{'0' * (point - len(text))}"
        return f"{minus}{text[:point]}.{text[point:]}"
    mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
    return f"{minus}{mantissa}e{'-' if lead < 0 else '+'}{abs(lead):02d}"


def _shortest32(value: float) -> str:
    """The fewest digits that give back the same float4 (PostgreSQL's float4 output), as ``d.ddde±x``."""
    target = struct.pack("<f", value)
    for precision in range(9):
        text = f"{value:.{precision}e}"
        try:
            if struct.pack("<f", float(text)) == target:
                return text
        except OverflowError:  # rounded up past the largest float4
            continue
    return repr(value)


def timestamp_text(value: dt.datetime) -> str:
    text = f"{value.year:04d}-{value.month:02d}-{value.day:02d} " + _clock(
        value.hour, value.minute, value.second, value.microsecond)
    offset = value.utcoffset()
    if offset is None:
        return text
    seconds = int(offset.total_seconds())
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    text += f"{sign}{hours:02d}"
    if minutes or secs:
        text += f":{minutes:02d}"
    if secs:
        text += f":{secs:02d}"
    return text


def _clock(hour: int, minute: int, second: int, micro: int) -> str:
    text = f"{hour:02d}:{minute:02d}:{second:02d}"
    return text + f".{micro:06d}".rstrip("0") if micro else text


def pandas_column(values: Sequence[Any], oid: int) -> Any:
    """A pandas array for one column: nullable integers and floats (NaN and NULL kept apart), nullable
    booleans, datetime64[us] timestamps, else object. A column holding PostgreSQL text for values Python
    cannot hold (``infinity``) stays object."""
    import numpy as np
    import pandas as pd

    present = [v for v in values if v is not None]
    if oid not in PANDAS_DTYPES or (oid in FALLIBLE_OIDS and any(isinstance(v, str) for v in present)):
        return _objects(values)  # text types (pandas may infer its string dtype), or text for some values
    if oid in (INT2, INT4, INT8, OID):
        return pd.array(values, dtype=PANDAS_DTYPES[oid])
    if oid in (FLOAT4, FLOAT8):
        mask = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
        data = np.fromiter((0.0 if v is None else v for v in values), dtype="float64", count=len(values))
        return pd.arrays.FloatingArray(data, mask)
    if oid == BOOL:
        return pd.array(values, dtype="boolean")
    if oid == TIMESTAMP:
        return pd.array(values, dtype="datetime64[us]")
    if oid == TIMESTAMPTZ and present:
        return pd.array(values, dtype=pd.DatetimeTZDtype(unit="us", tz=present[0].tzinfo))
    return _objects(values)


def _objects(values: Sequence[Any]) -> Any:
    import numpy as np

    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out
