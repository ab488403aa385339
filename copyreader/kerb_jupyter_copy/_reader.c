/* Whole blocks of a COPY ... TO STDOUT, read from psycopg's own PGconn in C, without the GIL.
 *
 * libpq hands a COPY over one row (one CopyData message) per PQgetCopyData call; in Python that loop costs about
 * 0.9 s per million rows. Here it runs in C with the GIL released, appending rows to one buffer until it holds
 * `limit` bytes, and waits for the socket itself (poll), so pyarrow's parser thread runs meanwhile.
 *
 * No libpq headers and no link to any libpq: the PGconn belongs to the libpq psycopg loaded (psycopg-binary
 * bundles its own, under a hashed file name), and a PGconn must only ever be passed to the very library that
 * made it (its struct differs between libpq versions). So the Python side resolves the four functions from
 * psycopg's own extension module (dlsym searches that module's dependencies, so it finds exactly the libpq it
 * was linked with) and hands their addresses to bind() once. Nothing here can pick up another libpq by accident.
 *
 * The connection's state machine stays psycopg's: read_block() only takes CopyData messages (PQgetCopyData) and
 * reads the socket (PQconsumeInput); when it returns -1 the COPY's final result waits in libpq for the caller
 * (PQgetResult), exactly as after psycopg's own read loop. On Ctrl-C the KeyboardInterrupt is raised from here
 * (the signal is checked whenever the socket has been silent for 50 ms or poll was interrupted) with the COPY still
 * running: the caller cancels it (psycopg's copy context and the caller's drain do).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct pg_conn PGconn; /* opaque */
typedef int (*getcopydata_fn)(PGconn *, char **, int);
typedef void (*freemem_fn)(void *);
typedef int (*consumeinput_fn)(PGconn *);
typedef int (*socket_fn)(const PGconn *);

static getcopydata_fn pq_getcopydata;
static freemem_fn pq_freemem;
static consumeinput_fn pq_consumeinput;
static socket_fn pq_socket;
static unsigned long long blocks; /* read_block() calls that returned data: tests prove this path is taken */

#define WAIT_MS 50 /* longest wait between two checks for Ctrl-C */

static PyObject *
bind(PyObject *self, PyObject *args)
{
    unsigned long long getcopydata, freemem, consumeinput, sock;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKK:bind", &getcopydata, &freemem, &consumeinput, &sock))
        return NULL;
    if (!getcopydata || !freemem || !consumeinput || !sock) {
        PyErr_SetString(PyExc_ValueError, "bind: a libpq function address is 0");
        return NULL;
    }
    pq_getcopydata = (getcopydata_fn)(uintptr_t)getcopydata;
    pq_freemem = (freemem_fn)(uintptr_t)freemem;
    pq_consumeinput = (consumeinput_fn)(uintptr_t)consumeinput;
    pq_socket = (socket_fn)(uintptr_t)sock;
    Py_RETURN_NONE;
}

/* The rows go straight into the bytearray returned (no second copy of a block: --to's memory bound). It is this
 * call's own object until returned, so it is written without the GIL; only growing it takes the GIL. */
typedef struct {
    PyObject *block; /* a bytearray: its allocated size is the capacity */
    size_t size, capacity;
    PyThreadState **saved;
} Buffer;

static int
append(Buffer *buf, const char *row, size_t n)
{
    if (buf->size + n > buf->capacity) { /* a row past the slack: rare */
        size_t want = buf->capacity * 2;
        while (want < buf->size + n)
            want *= 2;
        PyEval_RestoreThread(*buf->saved);
        int failed = PyByteArray_Resize(buf->block, (Py_ssize_t)want);
        if (failed)
            PyErr_Clear(); /* reported as MemoryError by the caller */
        *buf->saved = PyEval_SaveThread();
        if (failed)
            return -1;
        buf->capacity = want;
    }
    memcpy(PyByteArray_AS_STRING(buf->block) + buf->size, row, n);
    buf->size += n;
    return 0;
}

/* read_block(pgconn_ptr, limit) -> (status, bytearray)
 * status 1: the block holds at least `limit` bytes and the COPY goes on; -1: the COPY ended (its result waits in
 * libpq: PQgetResult); -2: libpq failed (PQerrorMessage says why; the connection is likely broken). */
static PyObject *
read_block(PyObject *self, PyObject *args)
{
    unsigned long long address;
    Py_ssize_t limit;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kn:read_block", &address, &limit))
        return NULL;
    if (pq_getcopydata == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "read_block: bind() was not called");
        return NULL;
    }
    if (address == 0) {
        PyErr_SetString(PyExc_ValueError, "read_block: the connection is closed (PGconn pointer 0)");
        return NULL;
    }
    PGconn *conn = (PGconn *)(uintptr_t)address;
    int status = 0, no_memory = 0, interrupted = 0;
    size_t target = limit > 0 ? (size_t)limit : 1;
    size_t slack = 1 << 20; /* the row that crosses `limit` fits without growing; untouched pages cost no RSS */
    PyObject *block = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(target + slack));
    if (block == NULL)
        return NULL;
    PyThreadState *saved = PyEval_SaveThread();
    Buffer buf = {block, 0, target + slack, &saved};
    int consumed = 0; /* input was read from the socket since the last row: next, wait on it */
    while (status == 0) {
        char *row = NULL;
        int n = pq_getcopydata(conn, &row, 1);
        if (n > 0) {
            int failed = append(&buf, row, (size_t)n);
            pq_freemem(row);
            if (failed) {
                no_memory = 1;
                break;
            }
            if (buf.size >= target)
                status = 1;
            consumed = 0;
            continue;
        }
        if (n < 0) {
            status = n; /* -1 end of COPY, -2 error */
            break;
        }
        /* Nothing parsed is waiting: read what the socket holds (TLS or GSS may have decrypted bytes buffered
         * inside libpq that poll cannot see, so read first, then wait). */
        if (!consumed) {
            if (!pq_consumeinput(conn)) {
                status = -2;
                break;
            }
            consumed = 1;
            continue;
        }
        consumed = 0;
        struct pollfd fd = {pq_socket(conn), POLLIN, 0};
        if (fd.fd < 0) {
            status = -2;
            break;
        }
        int ready = poll(&fd, 1, WAIT_MS);
        if (ready <= 0) { /* silent for WAIT_MS, or a signal: Ctrl-C? (signals are checked with the GIL) */
            if (ready < 0 && errno != EINTR) {
                status = -2;
                break;
            }
            PyEval_RestoreThread(saved);
            interrupted = PyErr_CheckSignals();
            saved = PyEval_SaveThread();
            if (interrupted)
                break;
        }
    }
    PyEval_RestoreThread(saved);

    if (no_memory || interrupted) {
        Py_DECREF(block);
        return no_memory ? PyErr_NoMemory() : NULL;
    }
    if (PyByteArray_Resize(block, (Py_ssize_t)buf.size) < 0) { /* shrinking: frees the unused part if large */
        Py_DECREF(block);
        return NULL;
    }
    blocks++;
    return Py_BuildValue("(iN)", status, block);
}

static PyObject *
blocks_read(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLongLong(blocks);
}

static PyMethodDef methods[] = {
    {"blocks_read", blocks_read, METH_NOARGS, "blocks_read() -> int: read_block() calls that returned, so far."},
    {"bind", bind, METH_VARARGS,
     "bind(PQgetCopyData, PQfreemem, PQconsumeInput, PQsocket): the addresses of psycopg's libpq functions."},
    {"read_block", read_block, METH_VARARGS,
     "read_block(pgconn_ptr, limit) -> (status, bytearray): COPY rows until `limit` bytes, without the GIL.\n"
     "status 1: more to come; -1: the COPY ended (PQgetResult has its result); -2: libpq failed."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kerb_jupyter_copy._reader",
    "COPY TO STDOUT rows in large blocks, read in C from psycopg's libpq without the GIL.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__reader(void)
{
    return PyModule_Create(&module);
}
