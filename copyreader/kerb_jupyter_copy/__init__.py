"""kerb_jupyter's COPY reader: ``COPY ... TO STDOUT`` rows in blocks of N MB, read in C from psycopg's own libpq.

``read_block(conn.pgconn.pgconn_ptr, limit)`` -> ``(status, bytearray)``: 1 the block holds at least ``limit``
bytes and the COPY goes on; -1 the COPY ended (its final result waits for ``pgconn.get_result()``); -2 libpq failed
(``pgconn.error_message``). Raises KeyboardInterrupt on Ctrl-C with the COPY still running (cancel it).

Importing binds the C module to the libpq psycopg itself uses: the one its own extension module was linked with
(psycopg-binary bundles one under a hashed name), found by ``dlsym`` on that module, which searches its
dependencies. A PGconn must never reach another libpq. Raises ImportError when that libpq cannot be found.
"""

from __future__ import annotations

import ctypes
import importlib
import os

import psycopg

from ._reader import bind, blocks_read, read_block

__all__ = ["LIBPQ_VERSION", "blocks_read", "read_block"]


def _psycopg_libpq() -> ctypes.CDLL:
    impl = psycopg.pq.__impl__
    if impl == "python":  # psycopg's ctypes implementation: the very library object it calls
        from psycopg.pq import _pq_ctypes

        return _pq_ctypes.pq
    module = importlib.import_module(f"psycopg_{impl}.pq")  # psycopg_binary.pq or psycopg_c.pq
    path = getattr(module, "__file__", None)
    if not path:
        raise ImportError(f"kerb_jupyter_copy: psycopg's {impl} module has no file to find its libpq from")
    # RTLD_NOLOAD: the handle of the module already loaded, never a second copy.
    return ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)


def _bind() -> int:
    try:
        lib = _psycopg_libpq()
        functions = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
                     for name in ("PQgetCopyData", "PQfreemem", "PQconsumeInput", "PQsocket")]
        lib.PQlibVersion.restype = ctypes.c_int
        version = int(lib.PQlibVersion())
    except (OSError, AttributeError) as err:
        raise ImportError(f"kerb_jupyter_copy: cannot find psycopg's libpq functions: {err}") from None
    if version != psycopg.pq.version():
        raise ImportError(f"kerb_jupyter_copy: found libpq {version}, but psycopg uses {psycopg.pq.version()}")
    bind(*functions)
    return version


LIBPQ_VERSION = _bind()
