"""What exact values cost: kerb_jupyter's text-format results against psycopg's binary ones, on a real sandbox.

    .venv/bin/python benchmarks/bench_values.py [--rows 1000000] [--runs 5] [--small-runs 2000]

Groups (medians of alternating runs in this process, one PostgreSQL cluster over GSSAPI, gssencmode=disable):
1. common: all rows of 7 common columns (int8, float8, numeric, text, timestamptz, bool, int2) as Python rows:
   psycopg binary ``fetchall`` (what ``-o`` did before issue #16: the baseline), psycopg text ``fetchall`` with
   its default loaders, and ``query.run_sql`` (text format, our loaders: what ``-o`` does now).
2. dataframe: the same rows to a DataFrame: binary ``fetchall`` + ``DataFrame.from_records`` (the old
   ``--dataframe``, baseline) against ``run_sql`` + ``ResultSet.to_pandas`` (nullable integer dtypes).
3. edge: a timestamptz column whose last value is ``infinity``: the fast loaders fail on it and the result is
   loaded again keeping that value's text; against the same column without it.
4. select1: one ``SELECT 1`` through ``run_sql`` on a warm connection (type names cached) against the same with
   the per-connection name cache emptied before each call (one extra query), and a raw psycopg call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TABLE_SQL = """
DROP TABLE IF EXISTS common, edge;
CREATE TABLE common AS
SELECT g::int8 AS id, g * 1.5::float8 AS amount, (g % 1000)::numeric(10, 2) AS price, md5(g::text) AS label,
       timestamptz '2026-01-01' + g * interval '1 second' AS at, (g % 2 = 0) AS flag, (g % 32767)::int2 AS small
FROM generate_series(1, {rows}) AS g;
CREATE TABLE edge AS SELECT id, at FROM common;
UPDATE edge SET at = 'infinity' WHERE id = {rows};
ANALYZE common; ANALYZE edge;
"""
COMMON = "SELECT id, amount, price, label, at, flag, small FROM common"


def median_time(fn: Callable[[], Any]) -> float:
    gc.collect()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


class Methods:
    def __init__(self, conninfo: dict[str, Any]) -> None:
        import psycopg

        from kerb_jupyter.sql import pgtypes

        self.conn = psycopg.connect(**conninfo, autocommit=True)
        self.raw = psycopg.connect(**conninfo, autocommit=True)
        pgtypes.prepare(self.conn)

    def _run(self, sql: str) -> Any:
        from kerb_jupyter.sql.query import QueryOptions, run_sql

        return run_sql(self.conn, sql, {}, QueryOptions(limit=None), "bench")[-1]

    def _fetch(self, sql: str, binary: bool) -> Any:
        with self.raw.cursor(binary=binary) as cur:
            cur.execute(sql)
            return cur.fetchall(), [d.name for d in cur.description or ()]

    def psycopg_binary_rows(self) -> Any:
        return self._fetch(COMMON, True)

    def psycopg_text_rows(self) -> Any:
        return self._fetch(COMMON, False)

    def kerbsql_rows(self) -> Any:
        return self._run(COMMON)

    def psycopg_binary_dataframe(self) -> Any:
        import pandas as pd

        rows, names = self._fetch(COMMON, True)
        return pd.DataFrame.from_records(rows, columns=names)

    def kerbsql_dataframe(self) -> Any:
        return self._run(COMMON).to_pandas()

    def kerbsql_timestamps(self) -> Any:
        return self._run("SELECT id, at FROM common")

    def kerbsql_timestamps_with_infinity(self) -> Any:
        result = self._run("SELECT id, at FROM edge")
        assert "infinity" in {row[1] for row in result.rows if isinstance(row[1], str)}
        return result

    def raw_select1(self) -> Any:
        return self.raw.execute("SELECT 1").fetchall()

    def kerbsql_select1(self) -> Any:
        return self._run("SELECT 1")

    def kerbsql_select1_uncached_names(self) -> Any:
        from kerb_jupyter.sql import pgtypes

        pgtypes._NAMES[self.conn].clear()  # what every call would cost without the per-connection cache
        return self._run("SELECT 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--small-runs", type=int, default=2000)
    args = parser.parse_args()

    from kerb_jupyter.core import tickets
    from kerb_jupyter.sandbox import Sandbox

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the sandbox below is stopped, not orphaned
    with tempfile.TemporaryDirectory(prefix="kerb-bench-") as tmp, Sandbox(Path(tmp) / "sb", clusters=("bench",)) as sb:
        cache = Path(tmp) / "krb5cc"
        os.environ.update(sb.env, KRB5CCNAME=f"FILE:{cache}")
        tickets.acquire_with_keytab(sb.principal, sb.keytab, cache)
        server = sb.servers["bench"]
        print(f"loading {args.rows:,} rows ...", file=sys.stderr)
        server.admin(f'SET ROLE "{sb.principal}";' + TABLE_SQL.format(rows=args.rows), dbname="bench")
        m = Methods({"host": "localhost", "port": server.port, "dbname": "bench", "user": sb.principal,
                     "gssencmode": "disable"})
        groups = [
            ("common", ["psycopg_binary_rows", "psycopg_text_rows", "kerbsql_rows"], args.runs),
            ("dataframe", ["psycopg_binary_dataframe", "kerbsql_dataframe"], args.runs),
            ("edge", ["kerbsql_timestamps", "kerbsql_timestamps_with_infinity"], args.runs),
            ("select1", ["raw_select1", "kerbsql_select1", "kerbsql_select1_uncached_names"], args.small_runs),
        ]
        results: dict[str, dict[str, Any]] = {}
        for group, names, runs in groups:
            for name in names:
                getattr(m, name)()  # warm up
            times: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(runs):  # alternate, so drift hits every method alike
                for name in names:
                    fn = getattr(m, name)
                    if group == "select1":
                        started = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - started)
                    else:
                        times[name].append(median_time(fn))
            for name in names:
                results[name] = {"group": group, "median_s": statistics.median(times[name])}
    report(results, args)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    lines = [f"rows: {args.rows:,}; runs: {args.runs} (SELECT 1: {args.small_runs}); Python {sys.version.split()[0]}",
             "", "| group | method | median | x first in group |", "|---|---|---:|---:|"]
    first: dict[str, float] = {}
    for name, r in results.items():
        base = first.setdefault(r["group"], r["median_s"])
        t = r["median_s"]
        shown = f"{t * 1e6:.0f} us" if t < 0.001 else f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"
        lines.append(f"| {r['group']} | {name} | {shown} | {t / base:.2f} |")
    print("\n".join(lines))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "values.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
