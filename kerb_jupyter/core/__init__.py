"""The core every part shares: errors, configuration, identity, mapping, tickets, private files, tags, shared state.

May import: the standard library, gssapi/krb5 and boto3 only. Never jupyter_server, IPython, tornado, psycopg or
any other part of kerb_jupyter (``sql``, ``server``, ``doctor``, ``broker``, ``sandbox``, ``magic``, ``cli``).
"""
