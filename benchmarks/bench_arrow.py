"""The COPY -> Arrow path of %%kerbsql against psycopg, JupySQL and psql's COPY floor, on a real sandbox.

    .venv/bin/pip install '.[bench]'  &&  .venv/bin/python benchmarks/bench_arrow.py [--runs 3] [--export-rows 10000000]

Tables (stored, ANALYZEd): ``wide7`` 1,000,000 rows x 7 mixed columns (the bench_kerbsql table) and ``wide50``
200,000 rows x 50 columns (int, float8, numeric(12,2), text, timestamptz, bool, date, cycled). For each table and
each transport (``gssencmode=disable``, then ``require``), the methods run alternating in this process (medians);
the peak RSS growth of each is measured once in a fresh child process. Then ``--to x.parquet`` of
``--export-rows`` rows, once, in a fresh process (time and peak RSS). Results: a Markdown table with ratios, and
benchmarks/results/arrow.json.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kerbsql import TABLE_SQL, median_time, peak_mb

HERE = Path(__file__).resolve().parent
KINDS = ["g::int4", "g * 1.25::float8", "(g % 100000)::numeric(12, 2)", "md5(g::text)",
         "timestamptz '2026-01-01' + g * interval '1 second'", "(g % 3 = 0)", "date '2020-01-01' + g % 3000"]
WIDE50 = ("DROP TABLE IF EXISTS wide50; CREATE TABLE wide50 AS SELECT "
          + ", ".join(f"{KINDS[i % len(KINDS)].replace('g', f'(g + {i})')} AS c{i}" for i in range(50))
          + " FROM generate_series(1, {rows}) AS g; ANALYZE wide50;")
QUERIES = {"wide7": "SELECT id, amount, price, label, at, flag, small FROM bench", "wide50": "SELECT * FROM wide50"}


class Methods:
    """Every method reads ``self.query`` on connections made with ``self.conninfo`` / cluster ``self.cluster``."""

    def __init__(self, conninfo: dict[str, Any], cluster: str, query: str) -> None:
        import psycopg
        from IPython.core.interactiveshell import InteractiveShell

        self.conninfo, self.cluster, self.query = conninfo, cluster, query
        self.conn = psycopg.connect(**conninfo, autocommit=True)
        self.shell = InteractiveShell.instance()
        self.shell.run_cell("%load_ext kerb_jupyter")
        self.shell.run_cell("%load_ext sql")
        for line in ("displaycon = False", "feedback = 0", "autopandas = False"):
            self.shell.run_cell(f"%config SqlMagic.{line}")
        from sqlalchemy import create_engine

        self.shell.user_ns["_bench_engine"] = create_engine(
            "postgresql+psycopg://", creator=lambda: psycopg.connect(**conninfo))
        self.shell.run_cell("%sql _bench_engine")

    def psql_floor(self) -> Any:
        c = self.conninfo
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

    def kerbsql_dataframe(self) -> Any:
        return self.shell.run_line_magic("kerbsql", f"{self.cluster} --dataframe {self.query}")

    def kerbsql_arrow(self) -> Any:
        return self.shell.run_line_magic("kerbsql", f"{self.cluster} --arrow {self.query}")

    def jupysql_dataframe(self) -> Any:
        return self.shell.run_line_magic("sql", self.query).DataFrame()

    def export_parquet(self, path: str) -> Any:
        return self.shell.run_line_magic("kerbsql", f"{self.cluster} --to {path} {self.query}")

    def copy_csv_read(self) -> Any:  # transport only: psycopg reading the COPY stream, no parsing
        return self._copy_read("csv")

    def copy_binary_read(self) -> Any:
        return self._copy_read("binary")

    def _copy_read(self, fmt: str) -> int:
        n = 0
        with self.conn.cursor() as cur, cur.copy(f"COPY ({self.query}) TO STDOUT (FORMAT {fmt})") as copy:
            for block in copy:
                n += len(block)
        return n


def child(method: str) -> None:
    spec = json.loads(os.environ["BENCH_SPEC"])
    m = Methods(spec["conninfo"], spec["cluster"], spec["query"])
    m.shell.run_line_magic("kerbsql", f"{m.cluster} SELECT 1")
    base = peak_mb()
    started = time.perf_counter()
    getattr(m, method)(*spec.get("args", []))
    print(f"PEAK_MB={peak_mb() - base}\nSECONDS={time.perf_counter() - started}", flush=True)


def in_child(method: str, spec: dict[str, Any]) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", method], capture_output=True, text=True, check=True,
                         env=dict(os.environ, BENCH_SPEC=json.dumps(spec)))
    found = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line and line.isascii())
    return {"peak_mb": float(found["PEAK_MB"]), "seconds": float(found["SECONDS"])}


METHODS = ["psql_floor", "psycopg_dataframe", "kerbsql_dataframe", "kerbsql_arrow", "jupysql_dataframe",
           "copy_csv_read", "copy_binary_read"]
ENCRYPTED = ["psql_floor", "psycopg_dataframe", "kerbsql_dataframe"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--wide-rows", type=int, default=200_000)
    parser.add_argument("--export-rows", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="instead: cProfile of --dataframe and --arrow, and the pyarrow dtype backend")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)

    from kerb_jupyter import tickets
    from kerb_jupyter.sandbox import Sandbox

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="kerb-bench-") as tmp, Sandbox(Path(tmp) / "sb", clusters=("bench",)) as sb:
        cache = Path(tmp) / "state" / "krb5cc"
        os.environ.update(sb.env, KRB5CCNAME=f"FILE:{cache}")
        tickets.acquire_with_keytab(sb.principal, sb.keytab, cache)
        config = json.loads(sb.config_file.read_text())
        base = config["clusters"]["bench"]
        config["clusters"] = {"plain": {**base, "gssencmode": "disable"}, "gssenc": {**base, "gssencmode": "require"}}
        config["state_dir"] = str(cache.parent)
        sb.config_file.write_text(json.dumps(config))
        server = sb.servers["bench"]
        print("loading tables ...", file=sys.stderr)
        server.admin(f'SET ROLE "{sb.principal}";' + TABLE_SQL.format(rows=args.rows), dbname="bench")
        server.admin(f'SET ROLE "{sb.principal}";' + WIDE50.format(rows=args.wide_rows), dbname="bench")
        if args.profile:
            return profile({"host": "localhost", "port": server.port, "dbname": "bench", "user": sb.principal,
                            "gssencmode": "disable"})
        for cluster, mode, names in (("plain", "disable", METHODS), ("gssenc", "require", ENCRYPTED)):
            conninfo = {"host": "localhost", "port": server.port, "dbname": "bench", "user": sb.principal,
                        "gssencmode": mode}
            for table, query in QUERIES.items():
                print(f"{table} over {cluster} ...", file=sys.stderr)
                results[f"{table}/{cluster}"] = measure(conninfo, cluster, query, names, args.runs)
        print("export ...", file=sys.stderr)
        server.admin(f'SET ROLE "{sb.principal}";' + TABLE_SQL.replace("bench", "big").format(rows=args.export_rows),
                     dbname="bench")
        conninfo = {"host": "localhost", "port": server.port, "dbname": "bench", "user": sb.principal,
                    "gssencmode": "disable"}
        spec = {"conninfo": conninfo, "cluster": "plain", "query": QUERIES["wide7"].replace("bench", "big"),
                "args": [str(Path(tmp) / "x.parquet")]}
        results["export"] = {"rows": args.export_rows, **in_child("export_parquet", spec),
                             "file_mb": (Path(tmp) / "x.parquet").stat().st_size / 1e6}
    results["load_after"] = os.getloadavg()
    report(results, args)


def profile(conninfo: dict[str, Any]) -> None:
    """Where the time of --dataframe goes: cProfile (by own time) of one run per table, plus backend timings."""
    import cProfile
    import io
    import pstats

    for table, query in QUERIES.items():
        m = Methods(conninfo, "plain", query)
        for method in ("kerbsql_arrow", "kerbsql_dataframe"):
            getattr(m, method)()
            prof = cProfile.Profile()
            started = time.perf_counter()
            prof.runcall(getattr(m, method))
            took = time.perf_counter() - started
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(8)
            print(f"## {table}: {method} ({took:.2f} s under the profiler)\n")
            print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))
        for backend in ("numpy", "pyarrow"):
            m.shell.run_cell(f"%config KerbSqlMagics.dtype_backend = '{backend}'")
            print(f"{table}: --dataframe with dtype_backend={backend}: "
                  f"{median_time(m.kerbsql_dataframe, 3, collect=True):.2f} s (median of 3)")
        m.shell.run_cell("%config KerbSqlMagics.dtype_backend = 'numpy'")
        from IPython.core.interactiveshell import InteractiveShell

        InteractiveShell.clear_instance()


def measure(conninfo: dict[str, Any], cluster: str, query: str, names: list[str], runs: int) -> dict[str, Any]:
    m = Methods(conninfo, cluster, query)
    for name in names:
        getattr(m, name)()  # warm up
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(runs):  # alternate, so drift hits every method alike
        for name in names:
            times[name].append(median_time(getattr(m, name), 1, collect=True))
    out: dict[str, Any] = {}
    for name in names:
        out[name] = {"median_s": statistics.median(times[name]), "runs": times[name]}
        if name not in ("copy_csv_read", "copy_binary_read"):
            out[name]["peak_mb"] = in_child(name, {"conninfo": conninfo, "cluster": cluster, "query": query})["peak_mb"]
    m.conn.close()
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.clear_instance()
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    lines = [f"runs: {args.runs}; Python {sys.version.split()[0]}; load average before "
             f"{results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f}", "",
             "| table / transport | method | median s | x psycopg | x floor | peak RSS MB | x psycopg |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, group in results.items():
        if "/" not in key:
            continue
        base, floor = group["psycopg_dataframe"], group["psql_floor"]["median_s"]
        for name, r in group.items():
            mem = f"{r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f}" if "peak_mb" in r else "- | -"
            lines.append(f"| {key} | {name} | {r['median_s']:.2f} | {r['median_s'] / base['median_s']:.2f} | "
                         f"{r['median_s'] / floor:.2f} | {mem} |")
    e = results["export"]
    lines.append(f"\n--to x.parquet, {e['rows']:,} rows: {e['seconds']:.1f} s, peak RSS growth {e['peak_mb']:.0f} MB, "
                 f"file {e['file_mb']:.0f} MB")
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "arrow.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
