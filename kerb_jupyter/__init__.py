"""kerb_jupyter: Kerberos tickets kept alive for Jupyter, and SQL over GSSAPI from notebooks.

Server side: the ``kerb_jupyter.server.app`` jupyter-server extension. Kernel side: ``%load_ext kerb_jupyter``.
Both import lazily here, so loading the magic never imports jupyter_server.
"""

from __future__ import annotations

from typing import Any

from .core import errors as _errors
from .core.errors import *  # noqa: F403  # the error tree is the package's public surface

__version__ = "0.2.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .server.app import KerbJupyterApp

    return [{"module": "kerb_jupyter.server.app", "app": KerbJupyterApp}]


def load_ipython_extension(ipython: Any) -> None:
    from .magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magic import unload_ipython_extension as unload

    unload(ipython)


__all__ = [*_errors.__all__, "__version__"]
