"""REST handlers under /kerb-jupyter/api/, behind Jupyter's authentication and authorization."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

if TYPE_CHECKING:
    from .app import KerbJupyterApp

AUTH_RESOURCE = "kerb_jupyter"


class BaseHandler(ExtensionHandlerMixin, APIHandler):  # type: ignore[misc]
    auth_resource = AUTH_RESOURCE

    @property
    def app(self) -> KerbJupyterApp:
        return self.settings["kerb_jupyter_app"]  # type: ignore[no-any-return]

    def write_json(self, doc: dict[str, Any], status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc))

    def status_doc(self) -> dict[str, Any]:
        keeper = self.app.keeper
        if keeper is None:
            doc: dict[str, Any] = {"state": "unconfigured", "principal": None, "expires_at": None,
                                   "renew_until": None, "last_error": {
                                       "code": "not_configured",
                                       "message": "no principal and credential source are configured"}}
        else:
            doc = keeper.state.as_dict()
        doc["server_time"] = time.time()
        return doc


class StatusHandler(BaseHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.write_json(self.status_doc())


def handlers(base: str) -> list[tuple[str, type]]:
    base = base.rstrip("/")
    return [
        (rf"{base}/api/status", StatusHandler),
    ]
