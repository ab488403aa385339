"""The Jupyter server extension: the ExtensionApp, its REST API and status page, the ticket keeper and its sources.

Runs inside ``jupyter server``. May import ``core`` and ``sql``; nothing imports it but the package's entry point
and the ``cli``.
"""
