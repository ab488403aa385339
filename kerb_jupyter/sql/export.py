"""``%%kerbsql --to PATH``: a result written to Parquet, CSV or Arrow IPC while it streams in.

Memory stays bounded (blocks of a few tens of MB, one Parquet row group or IPC batch each), a progress line
shows rows, MB and rows/s, and the file appears under its final name only when complete: it is written next
to it as ``.NAME.XXXXXX.part`` and renamed; a failed or interrupted export removes that partial file.
Every Arrow type of the fast path goes into every format: Parquet, which has no month-day-nano type, gets
intervals as structs of months, days and nanoseconds (exact; ``--polars`` does the same). Each field of a
Parquet or Arrow file names its PostgreSQL type in its metadata (``pg_type``), as ``--arrow`` tables do.
"""

from __future__ import annotations

import csv
import html
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..core.errors import ConfigError, KerbJupyterError
from .arrowtext import interval_parts, with_interval_parts
from .arrowtypes import Decoder

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".arrow": "ipc", ".feather": "ipc", ".ipc": "ipc"}


def export_path(text: str) -> tuple[Path, str]:
    """The target file and its format (by extension). Raises ConfigError before anything runs."""
    path = Path(text).expanduser()
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"--to {text}: unknown file type {path.suffix or '(none)'!r}; use one of "
                          + ", ".join(sorted(FORMATS)))
    if not path.parent.is_dir():
        raise ConfigError(f"--to {text}: the directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"--to {text}: that is a directory")
    return path, fmt


class Exporter:
    """The ``arrow.Consumer`` that writes each block to the target file as it arrives."""

    block_bytes = 32 << 20

    def __init__(self, path: str, progress: Callable[[Exporter], None] | None = None) -> None:
        self.path, self.format = export_path(path)
        self.progress = progress
        self.notes: list[str] = []
        self._file_notes: list[str] = []
        self.rows = self.nbytes = 0
        self.started = time.monotonic()
        self._decoder: Decoder | None = None
        self._file: Any = None
        self._tmp: Path | None = None
        self._writer: Any = None

    def start(self, decoder: Decoder) -> None:
        self.abort()  # a retry after a lost connection starts over
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".part")
        self._file, self._tmp, self._decoder = os.fdopen(fd, "wb"), Path(tmp), decoder
        self.rows = self.nbytes = 0
        self._file_notes = []
        self.started = time.monotonic()
        if self.format == "csv":  # PostgreSQL's own CSV, with a header line
            header = io.StringIO()
            csv.writer(header, lineterminator="\n").writerow([p.name for p in decoder.plans])
            self._file.write(header.getvalue().encode())

    def work(self, block: bytearray) -> None:
        assert self._decoder is not None
        try:
            if self.format == "csv":
                self._file.write(block)
                self.rows += block.count(b"\n")  # live figure; quoted newlines count too, the final one is exact
            else:
                table = self._table(self._decoder.decode(block, streaming=True))
                if self._writer is None:
                    self._writer = self._open(table.schema)
                    self._decoder.fixed = True  # from now on a value that does not fit is an error naming it
                self._writer.write_table(table)
                self.rows += table.num_rows
        except (OSError, pa.ArrowException) as err:
            raise KerbJupyterError(f"cannot write {self.path}: {err}", code="export_failed") from None
        self.nbytes += len(block)
        if self.progress is not None:
            self.progress(self)

    def finish(self, rows: int, nbytes: int) -> None:
        decoder = self._decoder
        assert decoder is not None and self._tmp is not None
        try:
            if self.format != "csv" and self._writer is None:  # no rows: the file still has the columns
                empty = [decoder.finish_column(i, []) for i in range(len(decoder.plans))]
                self._writer = self._open(self._table(empty).schema)
            if self._writer is not None:
                self._writer.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
        except (OSError, pa.ArrowException) as err:
            self.abort()
            raise KerbJupyterError(f"cannot write {self.path}: {err}", code="export_failed") from None
        self._tmp, self._writer, self._file = None, None, None
        self.rows, self.nbytes, self.notes = max(rows, 0), nbytes, decoder.notes + self._file_notes
        if self.progress is not None:
            self.progress(self)

    def abort(self) -> None:
        """Close and remove the partial file (nothing under the final name)."""
        for closing in (self._writer, self._file):
            if closing is not None:
                try:
                    closing.close()
                except (OSError, pa.ArrowException):
                    pass  # the partial file is deleted below either way
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tmp, self._writer, self._file = None, None, None

    def _table(self, columns: list[pa.ChunkedArray]) -> pa.Table:
        """The decoded columns as the file holds them, each field naming its PostgreSQL type."""
        assert self._decoder is not None
        fields = []
        for i, plan in enumerate(self._decoder.plans):
            if self.format == "parquet" and columns[i].type != (parts := with_interval_parts(columns[i].type)):
                columns[i] = pa.chunked_array([interval_parts(c) for c in columns[i].chunks], parts)
                note = (f"column {plan.name!r} ({plan.type_name}) is written to Parquet, which has no month-day-nano "
                        "type, as struct<months: int32, days: int32, nanoseconds: int64>")
                if note not in self._file_notes:
                    self._file_notes.append(note)
            fields.append(pa.field(plan.name, columns[i].type, metadata={"pg_type": plan.type_name}))
        return pa.Table.from_arrays(columns, schema=pa.schema(fields))

    def _open(self, schema: pa.Schema) -> Any:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetWriter(self._file, schema)
        return pa.ipc.new_file(self._file, schema)

    def summary(self) -> str:
        return f"wrote {progress_text(self)} to {self.path}"


def progress_text(exporter: Exporter) -> str:
    took = max(time.monotonic() - exporter.started, 1e-6)
    return (f"{exporter.rows:,} rows, {exporter.nbytes / 1e6:,.1f} MB in {took:,.1f} s "
            f"({exporter.rows / took:,.0f} rows/s)")


def live_line(every: float = 0.5) -> Callable[[Exporter], None]:
    """A progress callback keeping one updating line in the notebook (at most one update per ``every`` s)."""
    from IPython import display as ipd

    html_page: Any = ipd.HTML
    display: Any = ipd.display
    handle: Any = None
    last = 0.0

    def show(exporter: Exporter) -> None:
        nonlocal handle, last
        now = time.monotonic()
        if now - last < every:
            return
        last = now
        page = html_page(f"<small class='kerbsql-progress'>⏳ {html.escape(progress_text(exporter))} → "
                    f"{html.escape(str(exporter.path))}</small>")
        if handle is None:
            handle = display(page, display_id=True)
        else:
            handle.update(page)

    return show
