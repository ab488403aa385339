"""kerb_jupyter's %%kerbsql against the alternatives, side by side in one run, on a real sandbox.

    .venv/bin/pip install '.[bench]'  &&  .venv/bin/python benchmarks/bench_kerbsql.py [--rows 1000000] [--runs 5]

Measures, on one PostgreSQL cluster over GSSAPI (gssencmode=disable, as recommended):
1. 1,000,000 rows x 7 mixed columns to a pandas DataFrame: psycopg binary fetchall + DataFrame (the baseline),
   ``%kerbsql --dataframe``, ``pandas.read_sql`` (SQLAlchemy + psycopg), JupySQL ``%sql`` + ``.DataFrame()``.
2. Showing the first rows of that 1,000,000-row query: ``%kerbsql`` (50 rows) vs JupySQL ``%sql`` (10 rows).
3. A ``SELECT 1`` cell: ``%kerbsql`` vs a plain IPython cell making the same psycopg call.

Times are medians of alternating runs in this process; memory is the peak RSS growth of a fresh child process
doing the operation once (VmHWM), so each number is that method's own. Results are printed as a Markdown table
with ratios to the baseline and written to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TABLE_SQL = """
DROP TABLE IF EXISTS bench;
CREATE TABLE bench AS
SELECT g AS id,
       g * 1.5::float8 AS amount,
       (g % 1000)::numeric(10, 2) AS price,
       md5(g::text) AS label,
       timestamptz '2026-01-01' + g * interval '1 second' AS at,
       (g % 2 = 0) AS flag,
       (g % 32767)::int2 AS small
FROM generate_series(1, {rows}) AS g;
ANALYZE bench;
"""
QUERY = "SELECT id, amount, price, label, at, flag, small FROM bench"


def peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def median_time(fn: Callable[[], Any], runs: int, collect: bool = False) -> float:
    times = []
    for _ in range(runs):
        if collect:
            gc.collect()  # the previous method's garbage is not this one's cost
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- the methods, each usable in this process or in a child ------------------------------------------------------
class Methods:
    def __init__(self, conninfo: dict[str, Any]) -> None:
        import psycopg
        from IPython.core.interactiveshell import InteractiveShell

        self.conninfo = conninfo
        self.conn = psycopg.connect(**conninfo, autocommit=True)
        self.shell = InteractiveShell.instance()
        self.shell.run_cell("%load_ext kerb_jupyter")
        self.shell.run_cell("%load_ext sql")
        self.shell.run_cell("%config SqlMagic.displaycon = False")
        self.shell.run_cell("%config SqlMagic.feedback = 0")
        self.shell.run_cell("%config SqlMagic.autopandas = False")
        self.shell.user_ns["_bench_conn"] = self.conn
        from sqlalchemy import create_engine

        self.engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(**conninfo))
        self.shell.user_ns["_bench_engine"] = self.engine
        self.shell.run_cell("%sql _bench_engine")

    def cell(self, code: str) -> Any:
        result = self.shell.run_cell(code, store_history=False, silent=False)
        if not result.success:
            raise RuntimeError(f"cell failed: {code[:60]!r}: {result.error_in_exec or result.error_before_exec}")
        return result.result

    # DataFrame of everything
    def psycopg_dataframe(self) -> Any:
        import pandas as pd

        with self.conn.cursor(binary=True) as cur:
            cur.execute(QUERY)
            rows = cur.fetchall()
            return pd.DataFrame.from_records(rows, columns=[d.name for d in cur.description])

    def kerbsql_dataframe(self) -> Any:
        return self.shell.run_line_magic("kerbsql", f"bench --dataframe {QUERY}")

    def pandas_read_sql(self) -> Any:
        import pandas as pd

        return pd.read_sql(QUERY, self.engine)

    def jupysql_dataframe(self) -> Any:
        return self.shell.run_line_magic("sql", QUERY).DataFrame()

    # The first rows of a big result, rendered as a notebook renders them
    def kerbsql_display(self) -> Any:
        return self.shell.run_line_magic("kerbsql", f"bench {QUERY}")._repr_html_()

    def jupysql_display(self) -> Any:
        return self.shell.run_line_magic("sql", QUERY)._repr_html_()

    # Small queries, as whole cells (IPython's per-cell work and the display of the result included)
    def plain_cell_select1(self) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return self.cell("_bench_conn.execute('SELECT 1').fetchall()")

    def kerbsql_select1(self) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return self.cell("%kerbsql bench SELECT 1")


def child_peak(method: str) -> float:
    """Peak RSS growth (MB) of a fresh process running ``method`` once, after the same set-up as here."""
    out = subprocess.run([sys.executable, __file__, "--child", method], env=os.environ.copy(),
                         capture_output=True, text=True, check=True)
    return float(next(line for line in out.stdout.splitlines() if line.startswith("PEAK_MB=")).split("=")[1])


def run_child(method: str) -> None:
    methods = Methods(json.loads(os.environ["BENCH_CONNINFO"]))
    methods.plain_cell_select1()
    base = peak_mb()
    getattr(methods, method)()
    print(f"PEAK_MB={peak_mb() - base}", flush=True)


# -- the run ---------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--small-runs", type=int, default=300)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child)

    from kerb_jupyter.core import tickets
    from kerb_jupyter.sandbox import Sandbox

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the sandbox below is stopped, not orphaned

    with tempfile.TemporaryDirectory(prefix="kerb-bench-") as tmp, Sandbox(Path(tmp) / "sb", clusters=("bench",)) as sb:
        cache = Path(tmp) / "state" / "krb5cc"
        os.environ.update(sb.env, KRB5CCNAME=f"FILE:{cache}")
        tickets.acquire_with_keytab(sb.principal, sb.keytab, cache)
        config = json.loads(sb.config_file.read_text())
        config["clusters"]["bench"].update(gssencmode="disable")
        config["state_dir"] = str(cache.parent)
        sb.config_file.write_text(json.dumps(config))
        server = sb.servers["bench"]
        print(f"loading {args.rows:,} rows ...", file=sys.stderr)
        server.admin(f'SET ROLE "{sb.principal}";' + TABLE_SQL.format(rows=args.rows), dbname="bench")
        conninfo = {"host": "localhost", "port": server.port, "dbname": "bench", "user": sb.principal,
                    "gssencmode": "disable"}
        os.environ["BENCH_CONNINFO"] = json.dumps(conninfo)
        m = Methods(conninfo)
        results: dict[str, dict[str, float]] = {}

        groups = [
            ("dataframe", ["psycopg_dataframe", "kerbsql_dataframe", "pandas_read_sql", "jupysql_dataframe"],
             args.runs),
            ("first_rows", ["kerbsql_display", "jupysql_display"], args.runs),
            ("select1", ["plain_cell_select1", "kerbsql_select1"], args.small_runs),
        ]
        for group, names, runs in groups:
            for name in names:
                getattr(m, name)()  # warm up
            times: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(runs):  # alternate, so drift hits every method alike
                for name in names:
                    times[name].append(median_time(getattr(m, name), 1, collect=group != "select1"))
            for name in names:
                results[name] = {"group": group, "median_s": statistics.median(times[name])}
                if group != "select1":
                    print(f"measuring memory of {name} ...", file=sys.stderr)
                    results[name]["peak_mb"] = child_peak(name)

    report(results, args)


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    baselines = {"dataframe": "psycopg_dataframe", "first_rows": "jupysql_display", "select1": "plain_cell_select1"}
    lines = [f"rows: {args.rows:,}; runs: {args.runs} (SELECT 1: {args.small_runs}); Python {sys.version.split()[0]}",
             "", "| group | method | median | x baseline | peak RSS growth MB |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        base = results[baselines[r["group"]]]["median_s"]
        t = r["median_s"]
        shown = f"{t * 1000:.2f} ms" if t < 1 else f"{t:.2f} s"
        mem = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        lines.append(f"| {r['group']} | {name} | {shown} | {t / base:.2f} | {mem} |")
    text = "\n".join(lines)
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
