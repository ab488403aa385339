"""The COPY -> Arrow path of %%kerbsql (C reader and Python fallback) beside psycopg, JupySQL, ADBC, connectorx,
DuckDB and psql's COPY floor, on a real sandbox; every measurement in a fresh process.

    .venv/bin/pip install '.[bench]' ./copyreader   # optional: adbc-driver-postgresql connectorx duckdb
    .venv/bin/python benchmarks/bench_arrow.py [--runs 7] [--export-rows 10000000] [--only wide7]

Tables (stored, ANALYZEd): ``wide7`` 1,000,000 rows x 7 mixed columns (the bench_kerbsql table) and ``wide50``
200,000 rows x 50 columns (int, float8, numeric(12,2), text, timestamptz, bool, date, cycled). For each table and
each transport (GSS auth with ``gssencmode=disable``, then GSS encryption with ``require``), the methods alternate,
round after round; each measurement is a fresh child process that connects (and logs in) first, then runs the
operation once, timed, and reports the time and its peak RSS growth. Medians over the rounds. The floor is
``psql -c "COPY (...) TO STDOUT (FORMAT binary)" > /dev/null`` (process start and GSS login included).
ADBC, connectorx and DuckDB cannot log in with Kerberos: where installed, they connect over the server's Unix socket
as the superuser (trust), and their rows say "no Kerberos". Then ``--to x.parquet`` of ``--export-rows`` rows, once.
Results: a Markdown table with ratios, and benchmarks/results/arrow.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kerbsql import TABLE_SQL, peak_mb

HERE = Path(__file__).resolve().parent
KINDS = ["g::int4", "g * 1.25::float8", "(g % 100000)::numeric(12, 2)", "md5(g::text)",
         "timestamptz '2026-01-01' + g * interval '1 second'", "(g % 3 = 0)", "date '2020-01-01' + g % 3000"]
WIDE50 = ("DROP TABLE IF EXISTS wide50; CREATE TABLE wide50 AS SELECT "
          + ", ".join(f"{KINDS[i % len(KINDS)].replace('g', f'(g + {i})')} AS c{i}" for i in range(50))
          + " FROM generate_series(1, {rows}) AS g; ANALYZE wide50;")
QUERIES = {"wide7": "SELECT id, amount, price, label, at, flag, small FROM bench", "wide50": "SELECT * FROM wide50"}

LABELS = {
    "psql_floor": "psql COPY binary > /dev/null (floor)",
    "psycopg_dataframe": "psycopg binary `fetchall()` + DataFrame (baseline)",
    "kerbsql_dataframe": "`%kerbsql --dataframe` (C reader)",
    "kerbsql_dataframe_python": "`%kerbsql --dataframe` (Python reader)",
    "kerbsql_dataframe_pyarrow": "`%kerbsql --dataframe`, dtype_backend='pyarrow' (C reader)",
    "kerbsql_arrow": "`%kerbsql --arrow` (C reader)",
    "kerbsql_arrow_python": "`%kerbsql --arrow` (Python reader)",
    "kerbsql_parquet": "`%kerbsql --to x.parquet` (C reader)",
    "jupysql_dataframe": "JupySQL `%sql` + `.DataFrame()`",
    "adbc_dataframe": "ADBC -> Arrow -> pandas (no Kerberos)",
    "connectorx_dataframe": "connectorx -> pandas (no Kerberos)",
    "duckdb_dataframe": "DuckDB postgres scan -> pandas (no Kerberos)",
}
PLAIN = ["psql_floor", "psycopg_dataframe", "kerbsql_dataframe", "kerbsql_dataframe_python",
         "kerbsql_dataframe_pyarrow", "kerbsql_arrow", "kerbsql_arrow_python", "kerbsql_parquet", "jupysql_dataframe",
         "adbc_dataframe", "connectorx_dataframe", "duckdb_dataframe"]
ENCRYPTED = ["psql_floor", "psycopg_dataframe", "kerbsql_dataframe", "kerbsql_dataframe_python", "kerbsql_arrow",
             "kerbsql_arrow_python", "kerbsql_parquet"]
NEEDS = {"adbc_dataframe": "adbc_driver_postgresql", "connectorx_dataframe": "connectorx", "duckdb_dataframe": "duckdb",
         "jupysql_dataframe": "sql"}


# -- one measurement, in a child process ------------------------------------------------------------------------------
class Child:
    """Set up what ``method`` needs (connected, logged in), then ``run()`` it once."""

    def __init__(self, spec: dict[str, Any], method: str) -> None:
        self.spec, self.method, self.query = spec, method, spec["query"]
        self.prepare = getattr(self, f"_prepare_{method.split('_')[0]}", lambda: None)
        self.prepare()

    def _prepare_kerbsql(self) -> None:
        from IPython.core.interactiveshell import InteractiveShell

        self.shell = InteractiveShell.instance()
        self.shell.run_cell("%load_ext kerb_jupyter")
        if self.method.endswith("_pyarrow"):
            self.shell.run_cell("%config KerbSqlMagics.dtype_backend = 'pyarrow'")
        self.shell.run_line_magic("kerbsql", f"{self.spec['cluster']} SELECT 1")  # connected and logged in
        import pandas  # noqa: F401  # imported before timing, as for every method

    def _prepare_psycopg(self) -> None:
        import pandas  # noqa: F401
        import psycopg

        self.conn = psycopg.connect(**self.spec["conninfo"], autocommit=True)

    def _prepare_jupysql(self) -> None:
        import psycopg
        from IPython.core.interactiveshell import InteractiveShell
        from sqlalchemy import create_engine

        self.shell = InteractiveShell.instance()
        self.shell.run_cell("%load_ext sql")
        for line in ("displaycon = False", "feedback = 0", "autopandas = False"):
            self.shell.run_cell(f"%config SqlMagic.{line}")
        conninfo = self.spec["conninfo"]
        self.shell.user_ns["_bench_engine"] = create_engine(
            "postgresql+psycopg://", creator=lambda: psycopg.connect(**conninfo))
        self.shell.run_cell("%sql _bench_engine")
        self.shell.run_line_magic("sql", "SELECT 1")

    def _prepare_adbc(self) -> None:
        import adbc_driver_postgresql.dbapi as adbc
        import pandas  # noqa: F401

        self.conn = adbc.connect(self.spec["socket_uri"])

    def _prepare_connectorx(self) -> None:
        import connectorx  # noqa: F401
        import pandas  # noqa: F401

    def _prepare_duckdb(self) -> None:
        import duckdb
        import pandas  # noqa: F401

        self.conn = duckdb.connect()
        self.conn.execute("LOAD postgres")
        self.conn.execute(f"ATTACH '{self.spec['socket_dsn']}' AS pg (TYPE postgres, READ_ONLY)")

    def run(self) -> Any:
        return getattr(self, self.method)()

    def psql_floor(self) -> Any:
        c = self.spec["conninfo"]
        env = dict(os.environ, PGGSSENCMODE=c["gssencmode"], PGHOST=c["host"], PGPORT=str(c["port"]),
                   PGDATABASE=c["dbname"], PGUSER=c["user"])
        with open(os.devnull, "wb") as null:
            subprocess.run(["psql", "-X", "-q", "-c", f"COPY ({self.query}) TO STDOUT (FORMAT binary)"],
                           env=env, stdout=null, check=True)

    def psycopg_dataframe(self) -> Any:  # the baseline
        import pandas as pd

        with self.conn.cursor(binary=True) as cur:
            cur.execute(self.query)
            rows = cur.fetchall()
            return pd.DataFrame.from_records(rows, columns=[d.name for d in cur.description])

    def _kerbsql(self, option: str) -> Any:
        return self.shell.run_line_magic("kerbsql", f"{self.spec['cluster']} {option} {self.query}")

    def kerbsql_dataframe(self) -> Any:
        return self._kerbsql("--dataframe")

    kerbsql_dataframe_python = kerbsql_dataframe_pyarrow = kerbsql_dataframe

    def kerbsql_arrow(self) -> Any:
        return self._kerbsql("--arrow")

    kerbsql_arrow_python = kerbsql_arrow

    def kerbsql_parquet(self) -> Any:
        return self._kerbsql(f"--quiet --to {self.spec['parquet']}")

    def jupysql_dataframe(self) -> Any:
        return self.shell.run_line_magic("sql", self.query).DataFrame()

    def adbc_dataframe(self) -> Any:
        with self.conn.cursor() as cur:
            cur.execute(self.query)
            return cur.fetch_arrow_table().to_pandas()

    def connectorx_dataframe(self) -> Any:
        import connectorx

        return connectorx.read_sql(self.spec["cx_uri"], self.query, return_type="pandas")

    def duckdb_dataframe(self) -> Any:
        return self.conn.execute(f"SELECT * FROM postgres_query('pg', $${self.query}$$)").df()


def child_main(method: str) -> None:
    spec = json.loads(os.environ["BENCH_SPEC"])
    try:
        child = Child(spec, method)
    except Exception as err:  # an optional engine that cannot run here: said in the table
        print(f"SKIP={type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}", flush=True)
        return
    base = peak_mb()
    cpu = _cpu()
    started = time.perf_counter()
    try:
        child.run()
    except Exception as err:
        if method not in NEEDS:
            raise
        print(f"SKIP={type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}", flush=True)
        return
    print(f"PEAK_MB={peak_mb() - base}\nSECONDS={time.perf_counter() - started}\nCPU={_cpu() - cpu}", flush=True)


def _cpu() -> float:
    """CPU seconds of this process (all threads) and its finished children (psql): less moved by load than time."""
    import resource

    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def in_child(method: str, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, BENCH_SPEC=json.dumps(spec))
    if method.endswith("_python"):
        env["KERB_JUPYTER_COPY_READER"] = "python"
    out = subprocess.run([sys.executable, __file__, "--child", method], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"{method} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    found = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line and line.isascii())
    if "SKIP" in found:
        return {"skip": found["SKIP"]}
    return {"peak_mb": float(found["PEAK_MB"]), "seconds": float(found["SECONDS"]), "cpu": float(found["CPU"])}


# -- the run ----------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--wide-rows", type=int, default=200_000)
    parser.add_argument("--export-rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--encrypted-runs", type=int, help="rounds for the GSS-encrypted groups (default: --runs)")
    parser.add_argument("--only", help="comma-separated methods (default: all)")
    parser.add_argument("--profile", action="store_true",
                        help="instead: a cProfile (own time) of --arrow and --dataframe per table, in this process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child)

    from kerb_jupyter.core import tickets
    from kerb_jupyter.sandbox import Sandbox

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {"load_before": os.getloadavg(), "loads": []}
    with tempfile.TemporaryDirectory(prefix="kerb-bench-") as tmp, Sandbox(Path(tmp) / "sb", clusters=("bench",)) as sb:
        cache = Path(tmp) / "state" / "krb5cc"
        os.environ.update(sb.env, KRB5CCNAME=f"FILE:{cache}")
        tickets.acquire_with_keytab(sb.principal, sb.keytab, cache)
        config = json.loads(sb.config_file.read_text())
        base = config["clusters"]["bench"]
        config["clusters"] = {"plain": {**base, "gssencmode": "disable"}, "gssenc": {**base, "gssencmode": "require"}}
        config["state_dir"] = str(cache.parent)
        sb.config_file.write_text(json.dumps(config))
        os.environ["KERB_JUPYTER_CONFIG"] = str(sb.config_file)
        server = sb.servers["bench"]
        print("loading tables ...", file=sys.stderr)
        server.admin(f'SET ROLE "{sb.principal}";' + TABLE_SQL.format(rows=args.rows), dbname="bench")
        server.admin(f'SET ROLE "{sb.principal}";' + WIDE50.format(rows=args.wide_rows), dbname="bench")
        server.admin(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{sb.principal}"', dbname="bench")
        sock = str(server.sockdir)
        common = {"socket_uri": f"postgresql://postgres@/bench?host={sock}&port={server.port}",
                  "socket_dsn": f"host={sock} port={server.port} dbname=bench user=postgres",
                  "cx_uri": f"postgresql://postgres@{quote(sock, safe='')}:{server.port}/bench",  # the socket
                  "parquet": str(Path(tmp) / "x.parquet")}
        only = set(args.only.split(",")) if args.only else None
        if args.profile:
            conninfo = {"host": "localhost", "port": server.port, "dbname": "bench", "user": sb.principal,
                        "gssencmode": "disable"}
            return profile({**common, "conninfo": conninfo, "cluster": "plain"})
        for cluster, mode, names, runs in (("plain", "disable", PLAIN, args.runs),
                                           ("gssenc", "require", ENCRYPTED, args.encrypted_runs or args.runs)):
            conninfo = {"host": "localhost", "port": server.port, "dbname": "bench", "user": sb.principal,
                        "gssencmode": mode}
            chosen = [n for n in names if (only is None or n in only) and
                      (n not in NEEDS or importlib.util.find_spec(NEEDS[n]) is not None)]
            for table, query in QUERIES.items():
                print(f"{table} over {cluster}: {runs} rounds of {len(chosen)} methods ...", file=sys.stderr)
                spec = {**common, "conninfo": conninfo, "cluster": cluster, "query": query}
                results[f"{table}/{cluster}"] = measure(spec, chosen, runs, results["loads"])
        results["not_installed"] = [n for n in PLAIN if n in NEEDS and importlib.util.find_spec(NEEDS[n]) is None]
        if args.export_rows:
            print("export ...", file=sys.stderr)
            server.admin(f'SET ROLE "{sb.principal}";' + TABLE_SQL.replace("bench", "big").format(
                rows=args.export_rows), dbname="bench")
            conninfo = {"host": "localhost", "port": server.port, "dbname": "bench", "user": sb.principal,
                        "gssencmode": "disable"}
            spec = {**common, "conninfo": conninfo, "cluster": "plain",
                    "query": QUERIES["wide7"].replace("bench", "big")}
            results["export"] = {"rows": args.export_rows, **in_child("kerbsql_parquet", spec),
                                 "file_mb": Path(common["parquet"]).stat().st_size / 1e6}
    results["load_after"] = os.getloadavg()
    report(results, args)


def profile(spec: dict[str, Any]) -> None:
    """Where the time of --arrow and --dataframe goes: cProfile by own time, one warm run per table and method."""
    import cProfile
    import io
    import pstats

    from IPython.core.interactiveshell import InteractiveShell

    for table, query in QUERIES.items():
        for method in ("kerbsql_arrow", "kerbsql_dataframe"):
            child = Child({**spec, "query": query}, method)
            child.run()
            prof = cProfile.Profile()
            started = time.perf_counter()
            prof.runcall(child.run)
            took = time.perf_counter() - started
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(8)
            print(f"## {table}: {method} ({took:.2f} s under the profiler)\n")
            print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
            InteractiveShell.clear_instance()


def measure(spec: dict[str, Any], names: list[str], runs: int, loads: list[float]) -> dict[str, Any]:
    seen: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for _ in range(runs):  # alternate, so drift hits every method alike
        for name in names:
            seen[name].append(in_child(name, spec))
        loads.append(os.getloadavg()[0])
    out: dict[str, Any] = {}
    for name, got in seen.items():
        if any("skip" in g for g in got):
            out[name] = {"skip": next(g["skip"] for g in got if "skip" in g)}
            continue
        out[name] = {"median_s": statistics.median(g["seconds"] for g in got), "runs": [g["seconds"] for g in got],
                     "peak_mb": statistics.median(g["peak_mb"] for g in got),
                     "cpu_s": statistics.median(g["cpu"] for g in got)}
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    loads = results["loads"]
    lines = [f"rounds: {args.runs} (encrypted: {args.encrypted_runs or args.runs}); Python {sys.version.split()[0]}; "
             f"load average before {results['load_before'][0]:.1f}, during {min(loads):.1f}-{max(loads):.1f}, "
             f"after {results['load_after'][0]:.1f}", "",
             "| table / transport | method | median s | x psycopg | x floor | client CPU s | peak RSS MB | x psycopg |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, group in results.items():
        if "/" not in key:
            continue
        base, floor = group.get("psycopg_dataframe"), group.get("psql_floor")
        for name, r in group.items():
            if "skip" in r:
                lines.append(f"| {key} | {LABELS[name]} | not run: {r['skip']} | | | | | |")
                continue
            x_base = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
            x_floor = f"{r['median_s'] / floor['median_s']:.2f}" if floor else "-"
            mem = f"{r['peak_mb']:.0f}"
            x_mem = f"{r['peak_mb'] / base['peak_mb']:.2f}" if base and name != "psql_floor" else "-"
            lines.append(f"| {key} | {LABELS[name]} | {r['median_s']:.2f} | {x_base} | {x_floor} | {r['cpu_s']:.2f} | "
                         f"{mem if name != 'psql_floor' else '-'} | {x_mem} |")
    if results.get("not_installed"):
        lines.append(f"\nnot installed: {', '.join(results['not_installed'])}")
    if "export" in results:
        e = results["export"]
        lines.append(f"\n--to x.parquet, {e['rows']:,} rows: {e['seconds']:.1f} s, peak RSS growth "
                     f"{e['peak_mb']:.0f} MB, file {e['file_mb']:.0f} MB")
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "arrow.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
