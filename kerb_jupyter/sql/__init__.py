"""SQL over GSSAPI: connections, statements, exact values, result sets, the COPY -> Arrow fast path, exports, audit.

Used by the kernel's magic and by the server's cluster checks. May import ``core``; never ``server``, IPython or
jupyter_server.
"""
