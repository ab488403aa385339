"""Pure functions that tag queries with who ran them: a sqlcommenter comment and an application_name.

Values are URL-encoded (``quote(v, safe='')``), so no value can close the comment (``*/`` becomes
``%2A%2F``), break a quote, or start a new line; ``application_name`` is reduced to printable ASCII.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

APPLICATION_NAME_MAX = 63  # bytes; PostgreSQL truncates NAMEDATALEN-1
TAG_VALUE_MAX = 200  # characters per value before encoding: tags must fit track_activity_query_size


def build_comment(tags: Mapping[str, str | None]) -> str:
    """``/*key='value',...*/`` in sqlcommenter form, keys sorted, empty values left out."""
    parts = [
        f"{quote(str(k), safe='')}='{quote(str(v)[:TAG_VALUE_MAX], safe='')}'"
        for k, v in sorted(tags.items())
        if v not in (None, "")
    ]
    return f"/*{','.join(parts)}*/" if parts else ""


def tag_statement(sql: str, comment: str, has_params: bool) -> str:
    """Put the comment in front of the statement (so a truncated pg_stat_activity still shows it).

    With parameters, psycopg reads ``%`` as a placeholder: the comment's percent signs are doubled.
    """
    if not comment:
        return sql
    if has_params:
        comment = comment.replace("%", "%%")
    return f"{comment} {sql}"


def application_name(user: str, prefix: str = "kerb_jupyter") -> str:
    """``kerb_jupyter:<user>`` as printable ASCII without quotes or backslashes, at most 63 bytes."""
    safe = "".join(c if 32 < ord(c) < 127 and c not in "'\"\\" else "_" for c in user)
    return f"{prefix}:{safe}"[:APPLICATION_NAME_MAX]
