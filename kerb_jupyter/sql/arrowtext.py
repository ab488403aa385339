"""COPY's CSV text -> the Arrow arrays pyarrow's CSV reader cannot make, each conversion vectorised where it can be.

bytea (hex), intervals (ISO 8601 -> month_day_nano; and the struct of months, days and nanoseconds for Parquet and
polars, which have no such type), enums (one dictionary in the type's sort order), one-dimensional arrays, and
timestamptz text with any offset PostgreSQL writes (``+05:41:16`` too). A value a conversion cannot represent raises
``BadValue``; ``arrowtypes.Decoder`` then names its column.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

Convert = Callable[[pa.Array], pa.Array]
SECONDS_OFFSET = re.compile(r"[+-]\d\d:\d\d:\d\d$")  # local mean time before about 1900: +05:53:28


class BadValue(ValueError):
    """A value a conversion cannot represent; the Decoder adds the column's name."""

    def __init__(self, type_name: str, value: str) -> None:
        super().__init__(type_name, value)
        self.type_name, self.value = type_name, value


# -- conversions from COPY's text ---------------------------------------------------------------------------------
def bytea_array(text: pa.Array) -> pa.Array:
    """``\\x0aff`` (bytea_output = hex) -> binary."""
    return pa.array([None if v is None else bytes.fromhex(v[2:]) for v in text.to_pylist()], pa.binary())


_ISO_INTERVAL = re.compile(
    r"P(?:(-?\d+)Y)?(?:(-?\d+)M)?(?:(-?\d+)D)?(?:T(?:(-?\d+)H)?(?:(-?\d+)M)?(?:(-?\d+(?:\.\d+)?)S)?)?$")


def parse_interval(text: str) -> tuple[int, int, int]:
    """An ISO 8601 interval as PostgreSQL writes it (IntervalStyle = iso_8601) -> (months, days, nanoseconds)."""
    m = _ISO_INTERVAL.match(text)
    if m is None:
        raise BadValue("month_day_nano_interval", text)
    years, months, days, hours, minutes = (int(g or 0) for g in m.groups()[:5])
    seconds = Decimal(m.group(6) or 0)
    nanos = int((hours * 3600 + minutes * 60) * 10**9 + seconds * 10**9)
    return years * 12 + months, days, nanos


def interval_array(text: pa.Array) -> pa.Array:
    """ISO 8601 interval text -> month_day_nano_interval (exact: months, days and time kept apart)."""
    unique = pc.unique(text)
    parsed = [None if v is None else parse_interval(v) for v in unique.to_pylist()]
    return pa.array(parsed, pa.month_day_nano_interval()).take(pc.index_in(text, unique))


INTERVAL_PARTS = pa.struct([("months", pa.int32()), ("days", pa.int32()), ("nanoseconds", pa.int64())])


def with_interval_parts(arrow_type: pa.DataType) -> pa.DataType:
    """``arrow_type`` with intervals (also in lists) as INTERVAL_PARTS: for Parquet and polars, which lack the type."""
    if arrow_type == pa.month_day_nano_interval():
        return INTERVAL_PARTS
    if pa.types.is_list(arrow_type) and arrow_type.value_type == pa.month_day_nano_interval():
        return pa.list_(INTERVAL_PARTS)
    return arrow_type


def interval_parts(array: pa.Array) -> pa.Array:
    """month_day_nano_interval (or a list of them) -> struct<months, days, nanoseconds>, exact."""
    if pa.types.is_list(array.type):
        return pa.ListArray.from_arrays(array.offsets, interval_parts(array.values), mask=array.is_null())
    unique = pc.unique(array)  # few distinct intervals in most columns: Python touches each once
    parts = [None if v is None else {"months": v.months, "days": v.days, "nanoseconds": v.nanoseconds}
             for v in unique.to_pylist()]
    return pa.array(parts, INTERVAL_PARTS).take(pc.index_in(array, unique))


def enum_converter(labels: tuple[str, ...]) -> Convert:
    """Enum text -> dictionary<int32, string> with the type's labels in sort order (the same for every block)."""
    dictionary = pa.array(labels, pa.string())

    def convert(text: pa.Array) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pc.index_in(text, dictionary).cast(pa.int32()), dictionary)

    return convert


def element_converter(target: pa.DataType, convert: Convert | None = None) -> Convert:
    """Converts the flat element text of an array column to ``target`` (``convert``: the element type's own)."""
    if convert is not None:
        return convert
    if is_timestamptz(target):
        return timestamptz_converter(target)
    if pa.types.is_boolean(target):
        return lambda t: pc.equal(t, "t")
    if pa.types.is_time(target):
        return lambda t: pc.cast(pc.cast(pc.binary_join_element_wise("1970-01-01 ", t, ""), pa.timestamp("us")),
                                 target)
    if pa.types.is_string(target):
        return lambda t: t
    return lambda t: pc.cast(t, target)


def list_converter(convert: Convert) -> Convert:
    """``{1,2,NULL}`` text -> list<element>, ``convert`` making the elements; one-dimensional arrays only."""

    def to_lists(text: pa.Array) -> pa.Array:
        parsed = [None if v is None else parse_array(v) for v in text.to_pylist()]
        lists = pa.array(parsed, pa.list_(pa.string()))
        values = convert(lists.values)
        return pa.ListArray.from_arrays(lists.offsets, values, mask=lists.is_null())

    return to_lists


def parse_array(text: str) -> list[str | None]:
    """A one-dimensional PostgreSQL array literal -> element texts (None for NULL). Raises on nested arrays."""
    if text.startswith("["):  # explicit bounds: [0:2]={...}
        text = text[text.index("=") + 1:]
    if text[0] != "{" or text[-1] != "}":
        raise BadValue("list", text)
    out: list[str | None] = []
    i, n = 1, len(text) - 1
    while i < n:
        if text[i] == "{":
            raise BadValue("list (one dimension)", text)
        if text[i] == '"':
            j, chars = i + 1, []
            while text[j] != '"':
                if text[j] == "\\":
                    j += 1
                chars.append(text[j])
                j += 1
            out.append("".join(chars))
            i = j + 1
        else:
            j = text.find(",", i)
            j = n if j < 0 else j
            word = text[i:j]
            out.append(None if word == "NULL" else word)
            i = j
        i += 1  # the comma
    return out


# -- timestamptz text with any offset ----------------------------------------------------------------------------
_TSTZ_PARTS = (r"^(?P<local>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,6})?)(?P<sign>[+-])(?P<h>\d\d)"
               r"(?::(?P<m>\d\d))?(?::(?P<s>\d\d))?$")


def is_timestamptz(arrow_type: pa.DataType) -> bool:
    return pa.types.is_timestamp(arrow_type) and arrow_type.tz is not None


def timestamptz_converter(target: pa.DataType) -> Convert:
    """A Convert making timestamptz text ``target`` (timestamp with a zone)."""
    return lambda text: timestamptz_array(text, target)


def timestamptz_array(text: pa.Array, target: pa.DataType) -> pa.Array:
    """``2000-01-01 05:45:00+05:45`` -> ``target`` (timestamp with a zone): the instant the text names.

    Arrow's own parser reads offsets of hours and minutes; an offset with seconds (local mean time, years before
    about 1900) is applied here. Text that is no such timestamp (``infinity``, BC, year 10000) raises BadValue, or
    ArrowInvalid quoting it.
    """
    if not pc.any(pc.match_substring_regex(text, SECONDS_OFFSET.pattern)).as_py():
        return pc.cast(text, target)  # ArrowInvalid for infinity and BC: Decoder._converted names the value
    parts = pc.extract_regex(text, _TSTZ_PARTS)
    unmatched = pc.and_(text.is_valid(), parts.is_null())
    if pc.any(unmatched).as_py():
        raise BadValue(str(target), pc.filter(text, unmatched)[0].as_py())
    local, sign, *hms = parts.flatten()
    seconds: Any = pa.scalar(0, pa.int64())
    for unit, part in zip((3600, 60, 1), hms):
        seconds = pc.add(seconds, pc.multiply(pc.cast(pc.if_else(pc.equal(part, ""), "0", part), pa.int64()), unit))
    seconds = pc.if_else(pc.equal(sign, "-"), pc.negate(seconds), seconds)
    offset = pc.cast(pc.multiply(seconds, 10**6), pa.duration("us"))
    return pc.subtract(pc.cast(local, pa.timestamp("us")), offset).cast(target)
