"""%kerbsql --to: Parquet, Arrow and CSV exports in a shell and a kernel, streamed, atomic on failure, Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import run
from test_kernel_magic import kernel  # noqa: F401  # the fixture: a real kernel started by a real server

from kerb_jupyter.sql import arrow, export
from kerb_jupyter.sql.query import QueryOptions


@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".csv"])
def test_export_formats_match_the_table(shell, tmp_path, suffix, capsys):
    sql = ("SELECT id, started_at, city, distance_km, paid, CASE WHEN id % 5 = 0 THEN '' ELSE NULL END AS blank "
           "FROM trips ORDER BY id")
    expected = run(shell, f"%kerbsql analytics --arrow {sql}")
    target = tmp_path / f"trips{suffix}"
    run(shell, f"%kerbsql analytics --to {target} {sql}")
    assert "kerbsql: wrote 1,000 rows" in capsys.readouterr().out
    if suffix == ".parquet":
        assert pq.read_table(target).equals(expected)
    elif suffix == ".arrow":
        assert pa.ipc.open_file(target).read_all().equals(expected)
    else:
        lines = target.read_text().splitlines()
        assert lines[0] == "id,started_at,city,distance_km,paid,blank" and len(lines) == 1001
        assert lines[5].endswith(',t,""') and lines[11].endswith(",f,")  # PostgreSQL's CSV: "" vs NULL
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_streams_in_blocks_with_progress(conn, tmp_path):
    seen: list[tuple[int, int]] = []
    exporter = export.Exporter(str(tmp_path / "big.parquet"), lambda e: seen.append((e.rows, e.nbytes)))
    exporter.block_bytes = 64 << 10
    arrow.run_copy(conn, "SELECT g, md5(g::text) AS h, g * 1.5::float8 AS f FROM generate_series(1, 50000) g",
                   {}, QueryOptions(), consumer=exporter)
    meta = pq.ParquetFile(tmp_path / "big.parquet").metadata
    assert meta.num_rows == 50000 and meta.num_row_groups == len(seen) - 1 > 10  # one row group per block
    assert [r for r, _ in seen] == sorted(r for r, _ in seen) and seen[-1][0] == 50000
    assert "50,000 rows" in exporter.summary() and "rows/s" in exporter.summary()


def test_failed_export_leaves_no_partial_file_and_the_old_file_intact(shell, tmp_path, capsys):
    target = tmp_path / "out.parquet"
    target.write_bytes(b"the previous export")
    # ~60 MB of rows, so blocks were written before the error
    run(shell, f"%kerbsql analytics --to {target} SELECT repeat('x', 200) AS pad, 1 / (g - 300000) AS boom "
               "FROM generate_series(1, 400000) g")
    assert "SQL error 22012: division by zero" in capsys.readouterr().err
    # 'infinity' after row groups were written with timestamp: only now an error, naming column, row and value
    run(shell, f"%kerbsql analytics --to {target} SELECT repeat('x', 200) AS pad, CASE WHEN g < 300000 THEN "
               "now()::timestamp ELSE 'infinity' END AS ts FROM generate_series(1, 400000) g")
    assert "column 'ts', row 300000: the value 'infinity' does not fit Arrow's timestamp" in capsys.readouterr().err
    assert target.read_bytes() == b"the previous export"
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".part"]
    run(shell, f"%kerbsql analytics --to {target} SELECT 1 AS one")  # a complete export replaces it
    assert pq.read_table(target).to_pylist() == [{"one": 1}]
    # in the first block nothing is written yet: the column becomes text, as for --dataframe
    run(shell, f"%kerbsql analytics --to {target} SELECT g, CASE WHEN g = 2 THEN 'infinity' ELSE date '2026-01-01' "
               "END AS d FROM generate_series(1, 3) g")
    assert "column 'd' (date) holds 'infinity'" in capsys.readouterr().out
    assert pq.read_table(target).column("d").to_pylist() == ["2026-01-01", "infinity", "2026-01-01"]


def test_bad_targets_are_refused_before_running(shell, tmp_path, capsys):
    run(shell, f"%kerbsql analytics --to {tmp_path / 'x.xlsx'} SELECT 1")
    err = capsys.readouterr().err
    assert "unknown file type '.xlsx'; use one of .arrow, .csv, .feather, .ipc, .parquet, .pq" in err
    run(shell, f"%kerbsql analytics --to {tmp_path / 'nope' / 'x.csv'} SELECT 1")
    assert "does not exist" in capsys.readouterr().err
    run(shell, f"%kerbsql analytics --to {tmp_path / 'x.csv'} --dataframe SELECT 1")
    assert "--to writes a file" in capsys.readouterr().err
    run(shell, f"%%kerbsql analytics --to {tmp_path / 'x.csv'}\nSELECT 1; SELECT 2")
    assert "--to needs one SELECT" in capsys.readouterr().err


def interrupt_soon(delay: float = 1.0) -> threading.Timer:
    main = threading.get_ident()
    timer = threading.Timer(delay, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    return timer


def test_ctrl_c_cancels_the_copy_on_the_server_and_keeps_the_connection(shell, tmp_path, capsys):
    pid = run(shell, "%kerbsql analytics SELECT pg_backend_pid()").rows[0][0]
    interrupt_soon()
    out = run(shell, "%kerbsql analytics --dataframe SELECT pg_sleep(30)")
    assert out.status == "CANCELLED" and "kerbsql: cancelled" in capsys.readouterr().out
    interrupt_soon()
    target = tmp_path / "huge.parquet"
    out = run(shell, f"%kerbsql analytics --to {target} SELECT g, md5(g::text) FROM generate_series(1, 100000000) g")
    assert out.status == "CANCELLED" and not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".part"]
    assert run(shell, "%kerbsql analytics SELECT pg_backend_pid()").rows[0][0] == pid
    assert run(shell, "%kerbsql analytics SHOW IntervalStyle").rows == [("postgres",)]  # settings restored
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in audit if r["statement"].startswith("SELECT pg_sleep")] == ["cancelled"]


async def test_export_in_a_kernel_shows_a_live_progress_line(kernel, tmp_path):  # noqa: F811
    kernel.run("%load_ext kerb_jupyter")
    target = tmp_path / "live.parquet"
    out = kernel.run(f"%kerbsql analytics --to {target} SELECT g, md5(g::text) AS h, md5(g::text) AS h2 "
                     "FROM generate_series(1, 1500000) g", timeout=120)
    lines = [d["text/html"] for d in out.data if "kerbsql-progress" in d.get("text/html", "")]
    lines += [u.get("text/html", "") for u in out.updates if "kerbsql-progress" in u.get("text/html", "")]
    assert any(re.search(r"[\d,]+ rows, [\d.,]+ MB in [\d.]+ s \([\d,]+ rows/s\) → .*live.parquet", x)
               for x in lines), out.data
    assert "kerbsql: wrote 1,500,000 rows" in out.stdout
    assert pq.ParquetFile(target).metadata.num_rows == 1_500_000
