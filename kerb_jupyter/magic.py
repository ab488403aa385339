"""``%%kerbsql`` / ``%kerbsql``: SQL on configured clusters over the shared Kerberos ticket.

    %load_ext kerb_jupyter
    %%kerbsql analytics --limit 100
    SELECT * FROM trips WHERE city = :city

Parse -> resolve the cluster -> run (query.run_sql) -> render (results.ResultSet). Every kerb_jupyter
error becomes a one-line UsageError without a traceback; ``%config KerbSqlMagics.debug = True`` shows it.
Never imports jupyter_server.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
from IPython.core.error import UsageError
from IPython.core.magic import (
    Magics,
    line_cell_magic,
    line_magic,
    magics_class,
    needs_local_scope,
    no_var_expand,
)
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Enum, Float, Int

from .core.config import Settings, default_config_path, load_settings
from .core.errors import KerbJupyterError
from .core.state import keeper_state
from .sql import audit, db
from .sql.origin import notebook_path, tag_comment
from .sql.progress import Progress
from .sql.query import ConnectionLost, QueryOptions, run_sql
from .sql.results import ResultSet


def parse_timeout(text: str) -> float:
    """``--timeout``: a finite number of seconds >= 0.001 (PostgreSQL counts milliseconds; 0 would mean none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout must be a number of seconds, not {text!r:.40}") from None
    if not math.isfinite(value) or value < 0.001:
        raise argparse.ArgumentTypeError(f"--timeout must be a finite number of seconds, at least 0.001 (1 ms), "
                                         f"not {text!r:.40}")
    return value


@magics_class
class KerbSqlMagics(Magics):
    display_limit = Int(
        50, config=True, help="Rows fetched and shown when neither -o, --dataframe nor --limit is given. Default 50."
    )
    debug = Bool(False, config=True, help="Show Python tracebacks for kerb_jupyter errors. Default False.")
    progress_after = Float(
        1.0, config=True,
        help="Seconds after which a running query shows a 'running for N s' line (0 turns it off). Default 1.",
    )
    dtype_backend = Enum(
        ["numpy_nullable", "pyarrow", "numpy"], "numpy_nullable", config=True,
        help="dtypes of --dataframe results, by pandas' names (read_csv's dtype_backend): 'numpy_nullable' (nullable "
             "Int64/Float64/boolean, datetime64, objects) or 'pyarrow' (pd.ArrowDtype); 'numpy' is 'numpy_nullable'. "
             "Default 'numpy_nullable'.",
    )

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._settings: Settings | None = None
        self._stamp: tuple[Any, ...] = ()
        self._session: db.Session | None = None
        self._progress = Progress()

    # -- state -----------------------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self.refresh_settings()
        assert self._settings is not None
        return self._settings

    def refresh_settings(self) -> Settings:
        """Re-read the shared configuration if its file changed (an admin adds a cluster: no restart).

        Called once per magic call; raises ConfigError for a malformed file."""
        path = default_config_path()
        try:
            st = os.stat(path)
            stamp: tuple[Any, ...] = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = (str(path), None)
        if self._settings is None or stamp != self._stamp:
            settings = load_settings()
            if self._session is None:
                self._session = db.Session(settings)
            else:
                self._session.reconfigure(settings)
            self._settings, self._stamp = settings, stamp
        return self._settings

    @property
    def session(self) -> db.Session:
        _ = self.settings
        assert self._session is not None
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    # -- magics -----------------------------------------------------------------------------------
    @magic_arguments()
    @argument("cluster", nargs="?", help="name of a configured cluster")
    @argument("-o", "--out", metavar="VAR", help="store the result (all rows) in this variable")
    @argument("--limit", type=int, metavar="N", help="fetch at most N rows")
    @argument("--timeout", type=parse_timeout, metavar="SECONDS",
              help="statement_timeout for this cell (finite, at least 0.001 s)")
    @argument("--dataframe", action="store_true", help="return a pandas DataFrame (all rows)")
    @argument("--arrow", action="store_true", help="return a pyarrow.Table (all rows)")
    @argument("--polars", action="store_true", help="return a polars DataFrame (all rows)")
    @argument("--to", metavar="PATH", help="stream the result into a .parquet, .csv or .arrow file")
    @argument("--quiet", action="store_true", help="show nothing (use with -o)")
    @argument("--list", action="store_true", help="list the configured clusters")
    @needs_local_scope
    @no_var_expand  # IPython would rewrite "$$" and "{name}" in the SQL of the line form
    @line_cell_magic
    def kerbsql(self, line: str, cell: str | None = None, local_ns: dict[str, Any] | None = None) -> Any:
        """Run SQL on a configured cluster with the shared Kerberos ticket."""
        try:
            return self._kerbsql(line, cell, local_ns or {})
        except KerbJupyterError as err:
            if self.debug:
                raise
            raise UsageError(str(err)) from None

    def _kerbsql(self, line: str, cell: str | None, local_ns: dict[str, Any]) -> Any:
        self.refresh_settings()
        options, line_sql = split_line(line)
        args = _parse(self.kerbsql, options)
        if args.list:
            return self._list()
        if not args.cluster:
            raise UsageError("usage: %%kerbsql CLUSTER [options]  (%kerbsql --list shows the clusters)")
        sql = cell if cell is not None else line_sql
        if not sql.strip():
            raise UsageError(f"no SQL given: put the query in the cell below %%kerbsql {args.cluster}")
        if args.limit is not None and args.limit < 0:
            raise UsageError("--limit must be 0 or more")
        output = "arrow" if args.arrow else "polars" if args.polars else "pandas" if args.dataframe else None
        if output or args.to:
            return self._kerbsql_copy(args, sql, ChainMap(local_ns, self.shell.user_ns if self.shell else {}), output)
        fetch_all = bool(args.out or args.dataframe)
        limit = args.limit if args.limit is not None else (None if fetch_all else self.display_limit)
        namespace = ChainMap(local_ns, self.shell.user_ns if self.shell else {})  # no copy of user_ns
        results = self._run(args.cluster, sql, namespace, QueryOptions(limit, args.timeout))
        last = results[-1]
        value: Any = last.to_pandas() if args.dataframe and last.has_rows else last
        if args.out and self.shell is not None:
            self.shell.user_ns[args.out] = value
        if args.quiet:
            return None
        if self.shell is not None:
            from IPython.display import display

            for earlier in results[:-1]:
                display(earlier)
        return value

    @line_magic
    def kerbstatus(self, line: str = "") -> Any:
        """Show the shared Kerberos ticket and what the server's keeper reports (``--doctor``: every check)."""
        from .core.state import credential_status

        if line.strip() == "--doctor":
            from .doctor.run import run_doctor

            return run_doctor()
        try:
            return credential_status(self.refresh_settings())
        except KerbJupyterError as err:
            raise UsageError(str(err)) from None

    def _kerbsql_copy(self, args: Any, sql: str, namespace: Mapping[str, Any], output: str | None) -> Any:
        """One statement streams through COPY into Arrow (arrow.py); others take the usual path, then convert."""
        try:
            from .sql import arrow, export
        except ImportError:  # pyarrow is in the pandas/arrow/polars extras; without it --dataframe goes row by row
            if output == "pandas" and not args.to:
                results = self._run(args.cluster, sql, namespace, QueryOptions(args.limit, args.timeout))
                return self._deliver(args, results[-1].to_pandas() if results[-1].has_rows else results[-1],
                                     results[:-1])
            raise UsageError("--dataframe, --arrow, --polars and --to need pyarrow: "
                             "pip install 'kerb_jupyter[pandas]'") from None
        if args.to and output:
            raise UsageError("--to writes a file: use it without --dataframe, --arrow or --polars")
        opts = QueryOptions(args.limit, args.timeout)
        if args.limit is not None or arrow.copy_step(sql) is None:
            if args.to:
                raise UsageError("--to needs one SELECT/WITH/VALUES/TABLE statement (or DML with RETURNING) "
                                 "and no --limit")
            results = self._run(args.cluster, sql, namespace, opts)
            return self._deliver(args, arrow.result_output(results[-1], output or "", self._backend()), results[:-1])
        live = export.live_line() if getattr(self.shell, "kernel", None) is not None else None
        consumer: Any = export.Exporter(args.to, live) if args.to else arrow.Collector()
        results = self._run(args.cluster, sql, namespace, opts, functools.partial(arrow.run_copy, consumer=consumer))
        for note in consumer.notes:
            print(f"kerbsql: {note}")
        if results[-1].status == "CANCELLED":
            return results[-1]
        if args.to:
            print(f"kerbsql: {consumer.summary()}")
            results[-1].columns = []  # shown as its status line ("COPY n"), not as an empty table
            return self._deliver(args, results[-1], [])
        return self._deliver(args, arrow.to_output(consumer.table, output or "", self._backend()), [])

    def _backend(self) -> str:
        """arrow.py's name for ``dtype_backend``: "pyarrow", else "numpy" (numpy-backed, nullable dtypes)."""
        return "pyarrow" if self.dtype_backend == "pyarrow" else "numpy"

    def _deliver(self, args: Any, value: Any, earlier: list[ResultSet]) -> Any:
        if args.out and self.shell is not None:
            self.shell.user_ns[args.out] = value
        if not args.quiet and self.shell is not None:
            from IPython.display import display

            for result in earlier:
                display(result)
        return None if args.quiet else value

    def _run(self, cluster: str, sql: str, namespace: Mapping[str, Any], opts: QueryOptions,
             runner: Callable[..., list[ResultSet]] = run_sql) -> list[ResultSet]:
        self.settings.cluster(cluster)  # UnknownClusterError before anything else
        for attempt in (1, 2):
            conn = self.session.connection(cluster)
            info = db.check_ticket(self.settings)
            opts.comment = self._comment(cluster, info.principal)
            opts.observer = self._auditor(cluster, info.principal)
            try:
                # Only a kernel's front end renders the live line; a terminal IPython would print object reprs.
                in_kernel = getattr(self.shell, "kernel", None) is not None
                self._progress.after = self.progress_after if in_kernel else 0
                with self._progress.running(cluster):
                    return runner(conn, sql, namespace, opts, cluster)
            except ConnectionLost as err:
                self.session.discard(cluster)
                if attempt == 2 or err.statements_done:
                    raise
            except KeyboardInterrupt:
                aborted = conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
                print(f"kerbsql: cancelled; the query was stopped on {cluster} and the connection is kept."
                      + (" Your open transaction is aborted: run ROLLBACK." if aborted else ""))
                return [ResultSet(statement=sql, status="CANCELLED", cluster=cluster)]
        raise AssertionError("unreachable")

    def _auditor(self, cluster: str, principal: str) -> Any:
        path = self.settings.audit_log
        if path is None:
            return None
        identity = (keeper_state(self.settings) or {}).get("identity") or {}

        def observe(statement: str, result: ResultSet | None, error: BaseException | None, elapsed: float) -> None:
            outcome = "ok" if error is None else ("cancelled" if isinstance(error, KeyboardInterrupt) else
                                                  getattr(error, "code", None) or
                                                  f"sql_{getattr(getattr(error, 'diag', None), 'sqlstate', '')}")
            try:
                audit.record(path, identity=identity.get("name"), identity_source=identity.get("source"),
                             principal=principal, cluster=cluster, statement=statement,
                             rows=None if result is None else max(result.rowcount, len(result.rows)),
                             duration_ms=round(elapsed * 1000, 2), outcome=outcome)
            except OSError as err:  # an audit trail with holes is worse than a loud stop
                raise KerbJupyterError(
                    f"the audit log {path} could not be written ({err.strerror}); the statement "
                    f"{'ran' if error is None else 'failed'} on {cluster}, the rest of the cell was not run",
                    code="audit_failed",
                ) from None

        return observe

    def _comment(self, cluster: str, principal: str) -> str:
        if not self.settings.cluster(cluster).tagging:
            return ""
        identity = (keeper_state(self.settings) or {}).get("identity") or {}
        notebook = notebook_path(os.environ.get("JPY_SESSION_NAME"), os.environ.get("KERB_JUPYTER_ROOT_DIR"))
        return tag_comment(principal, identity.get("arn") or identity.get("name"), notebook)

    def _list(self) -> ResultSet:
        from .sql.results import Column

        rs = ResultSet(statement="--list", cluster="config", status="clusters")
        rs.columns = [Column(n, "text") for n in ("cluster", "host", "port", "dbname", "gssencmode")]
        rs.rows = [(c.name, c.host, c.port, c.dbname, c.gssencmode) for c in self.settings.clusters.values()]
        return rs


_VALUE_OPTIONS = {"-o", "--out", "--limit", "--timeout", "--to"}
_PLAIN = {"out": None, "limit": None, "timeout": None, "dataframe": False, "quiet": False, "list": False,
          "arrow": False, "polars": False, "to": None}


def _parse(magic: Any, options: str) -> Any:
    """The argparse namespace; the common ``CLUSTER``-only line skips argparse (a tenth of a cell's time)."""
    if options and " " not in options and not options.startswith("-"):
        return argparse.Namespace(cluster=options, **_PLAIN)
    return parse_argstring(magic, options)


def split_line(line: str) -> tuple[str, str]:
    """Split ``CLUSTER [options] [SQL...]`` into the option words and the raw SQL (never shlex-parsed)."""
    words = line.split()
    head: list[str] = []
    have_cluster = False
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-"):
            head.append(word)
            if word in _VALUE_OPTIONS and i + 1 < len(words):
                i += 1
                head.append(words[i])
        elif not have_cluster:
            head.append(word)
            have_cluster = True
        else:
            break
        i += 1
    return " ".join(head), _remainder(line, i)


def _remainder(line: str, skip: int) -> str:
    text = line.lstrip()
    for _ in range(skip):
        text = text.split(None, 1)[1] if len(text.split(None, 1)) > 1 else ""
        text = text.lstrip()
    return text


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(KerbSqlMagics)


def unload_ipython_extension(ipython: Any) -> None:
    magics = ipython.magics_manager.registry.get("KerbSqlMagics")
    if magics is not None:
        magics.close()


__all__ = ["KerbSqlMagics", "load_ipython_extension", "unload_ipython_extension"]
