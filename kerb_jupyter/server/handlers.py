"""REST handlers and the status page under /kerb-jupyter/, behind Jupyter's authentication and authorization.

Every error is JSON ``{"error": {"code": ..., "message": ...}}`` with a stable code and never a traceback.
``renew`` and ``check`` are rate-limited so nobody can use them to hammer the KDC or a database; cluster
checks run in a small pool of their own (over its bound: 429 at once), so hanging databases never delay
``status`` or ``renew``. After rejected credentials ``renew`` answers 409 without asking the KDC again.
"""

from __future__ import annotations

import html
import json
import time
from importlib.resources import files
from typing import Any, Protocol

import psycopg
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from ..core.config import Settings
from ..core.errors import KerbJupyterError, UnknownClusterError
from ..core.grants import require_grant
from ..sql import db
from .keeper import TicketKeeper
from .threads import in_daemon_thread

AUTH_RESOURCE = "kerb_jupyter"
HTTP_STATUS = {"unknown_cluster": 404, "rate_limited": 429, "checks_busy": 429, "not_configured": 409,
               "credentials_rejected": 409, "not_granted": 409, "cluster_refused": 409}


class RateLimiter:
    """At most one call per ``interval`` seconds per key (monotonic clock)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def retry_after(self, key: str) -> float:
        """0 if a call may go ahead now (and records it), else seconds to wait."""
        now = time.monotonic()
        wait = self._last.get(key, -1e18) + self.interval - now
        if wait > 0:
            return wait
        self._last[key] = now
        return 0.0


class ServerSide(Protocol):
    """What the handlers use of the extension (``KerbJupyterApp`` is one); they never import ``app``."""

    keeper: TicketKeeper | None
    config_error: KerbJupyterError | None
    settings_obj: Settings
    renew_limiter: RateLimiter
    check_limiter: RateLimiter
    checks_running: int
    max_concurrent_checks: int

    async def reload_if_changed(self) -> bool: ...


class BaseHandler(ExtensionHandlerMixin, APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def app(self) -> ServerSide:
        return self.settings["kerb_jupyter_app"]  # type: ignore[no-any-return]

    def write_json(self, doc: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(doc))

    def write_problem(self, code: str, message: str, status: int | None = None) -> None:
        self.write_json({"error": {"code": code, "message": message}}, status or HTTP_STATUS.get(code, 502))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # Never a traceback: only the status and tornado's short reason.
        reason = self._reason or "error"
        code = {401: "unauthenticated", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
            status_code, "server_error")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"code": code, "message": reason}}))

    def limited(self, limiter: RateLimiter, key: str) -> bool:
        wait = limiter.retry_after(key)
        if wait <= 0:
            return False
        self.set_header("Retry-After", str(max(1, round(wait))))
        self.write_problem("rate_limited", f"too many requests: try again in {wait:.0f} s")
        return True


def status_doc(app: ServerSide) -> dict[str, Any]:
    if app.config_error is not None:
        doc: dict[str, Any] = {
            "state": "error", "principal": None, "identity": None, "expires_at": None, "renew_until": None,
            "last_renewal": None, "next_attempt": None,
            "last_error": {"code": app.config_error.code, "message": str(app.config_error)},
        }
    elif app.keeper is None:
        doc = {
            "state": "unconfigured", "principal": None, "identity": None, "expires_at": None, "renew_until": None,
            "last_renewal": None, "next_attempt": None,
            "last_error": {"code": "not_configured",
                           "message": "no principal (or identity mapping) and credential source are configured"},
        }
    else:
        doc = app.keeper.state.as_dict()
    doc["server_time"] = time.time()
    return doc


class StatusHandler(BaseHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.write_json(status_doc(self.app))


class RenewHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        app = self.app
        reloaded = await app.reload_if_changed()  # an edited configuration applies now, without a restart
        if app.keeper is None:
            if app.config_error is not None:
                return self.write_problem("not_configured", f"there is no ticket to renew: {app.config_error}")
            return self.write_problem("not_configured", "there is no ticket to renew: nothing is configured")
        if reloaded:  # the new keeper's first attempt was this request's attempt
            return self._answer()
        if self.limited(app.renew_limiter, "renew"):
            return None
        held = await app.keeper.held()
        if held > 0:
            self.set_header("Retry-After", str(max(1, round(held))))
            return self.write_problem("credentials_rejected", self._rejected(
                f"not tried again for {_minutes(held)} to protect the account from lockout, unless the "
                "keytab, secret or configuration changes first"))
        await app.keeper.renew_now()
        return self._answer()

    def _answer(self) -> None:
        assert self.app.keeper is not None
        state = self.app.keeper.state
        if state.state == "error" and (state.last_error or {}).get("code") == "credentials_rejected":
            return self.write_problem("credentials_rejected", self._rejected(
                "fix the keytab or secret (a change is noticed at once), then renew again"))
        self.write_json(status_doc(self.app))
        return None

    def _rejected(self, advice: str) -> str:
        assert self.app.keeper is not None
        reason = (self.app.keeper.state.last_error or {}).get("message", "the KDC rejected the credentials")
        return f"{reason}; {advice}"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


class ClustersHandler(BaseHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.write_json({"clusters": [c.public() for c in self.app.settings_obj.clusters.values()]})


class ClusterCheckHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        app = self.app
        try:
            cluster = app.settings_obj.cluster(name)
        except UnknownClusterError as err:
            return self.write_problem(err.code, str(err))
        if app.checks_running >= app.max_concurrent_checks:
            self.set_header("Retry-After", "1")
            return self.write_problem("checks_busy", f"{app.checks_running} cluster checks are already running "
                                      "(the most allowed at once): try again when one has finished")
        if self.limited(app.check_limiter, cluster.name):
            return None
        app.checks_running += 1  # the bound: at most max_concurrent_checks threads of their own at once
        try:
            result = await in_daemon_thread(check_cluster, app, cluster.name, name="kerb-jupyter-check")
        except KerbJupyterError as err:
            return self.write_problem(err.code, str(err))
        finally:
            app.checks_running -= 1
        self.write_json(result)
        return None


def check_cluster(app: ServerSide, name: str) -> dict[str, Any]:
    """Connect with the shared ticket and report who we are there. Raises KerbJupyterError."""
    cluster = app.settings_obj.cluster(name)
    info = db.check_ticket(app.settings_obj)
    require_grant(info, cluster, app.keeper.state.as_dict() if app.keeper else None)  # the broker's reason, if any
    started = time.perf_counter()
    with db.connect(cluster, info.principal) as conn:
        try:
            row = conn.execute(
                "SELECT current_user, s.gss_authenticated, s.encrypted, current_setting('server_version') "
                "FROM pg_stat_gssapi s WHERE s.pid = pg_backend_pid()"
            ).fetchone()
        except psycopg.Error as err:  # the server went away mid-check: an answer, not a 500
            raise db.classify_connect_error(err, cluster, info.principal) from None
    latency = (time.perf_counter() - started) * 1000
    assert row is not None
    return {"cluster": name, "ok": True, "current_user": row[0], "gss_authenticated": row[1], "encrypted": row[2],
            "server_version": row[3], "latency_ms": round(latency, 1)}


class OpenAPIHandler(BaseHandler):
    @web.authenticated
    @authorized
    def get(self) -> None:
        self.set_header("Content-Type", "application/yaml")
        self.finish(files("kerb_jupyter.server").joinpath("openapi.yaml").read_text())


class PageHandler(ExtensionHandlerMixin, JupyterHandler):
    auth_resource = AUTH_RESOURCE

    @web.authenticated
    @authorized
    def get(self) -> None:
        page = files("kerb_jupyter.server").joinpath("static", "status.html").read_text()
        base = self.base_url.rstrip("/") + "/kerb-jupyter"
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        xsrf = self.xsrf_token.decode()
        self.finish(page.replace("{{base}}", html.escape(base, quote=True)).replace("{{xsrf}}", html.escape(xsrf)))


def handlers(base: str) -> list[tuple[str, type]]:
    base = base.rstrip("/")
    return [
        (rf"{base}/?", PageHandler),
        (rf"{base}/api/status", StatusHandler),
        (rf"{base}/api/renew", RenewHandler),
        (rf"{base}/api/clusters", ClustersHandler),
        (rf"{base}/api/clusters/([^/]+)/check", ClusterCheckHandler),
        (rf"{base}/api/openapi.yaml", OpenAPIHandler),
    ]
