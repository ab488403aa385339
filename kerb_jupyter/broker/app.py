"""The broker's tornado service: POST /v1/credentials, GET /healthz, GET /metrics; limits, audit, TLS.

Each request: rate limit by source address -> the signed request's own checks -> replay refusal -> STS ->
rate limit by ARN -> policy -> rate limit and hourly issue cap by principal -> S4U (in a thread) -> the cache.
Refusals before issuing answer 401/403/429 with a generic body and the request id; the reason goes to the audit
log and the broker's log only. Clusters are issued independently: the answer lists the issued ones and, under
``refused``, each one the KDC refused with its reason and a one-line message naming what to change; 403 (with
``refused``) only when the KDC refused them all. Every request, refused or not, leaves exactly one audit record.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import time
import uuid
from typing import Any

import tornado.httpclient
import tornado.httpserver
import tornado.web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ..core.errors import CredentialsRejectedError, IdentityError, KdcUnreachableError, KerbJupyterError, TicketError
from .audit import OUTAGES, AuditLog, OutageLog
from .auth import AuthError, Caller, check_request, parse_caller, parse_payload
from .groups import GroupDirectory
from .issue import Issuer
from .policy import Decision, Denied
from .settings import BrokerSettings, PolicyHolder
from .store import MemoryStore, Store, StoreUnavailable
from .stores import make_store

log = logging.getLogger(__name__)


class Refused(Exception):
    """Stops a request: HTTP status, audited reason, optional caller/principal for the record."""

    def __init__(self, status: int, reason: str, detail: str, *, public: str | None = None,
                 refused: dict[str, dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.public = status, reason, detail, public
        self.refused = refused  # the KDC's refusal of every cluster: shown to the caller


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.issued = Counter("kerb_jupyter_broker_issued", "Credential caches issued", registry=self.registry)
        self.clusters_refused = Counter("kerb_jupyter_broker_clusters_refused",
                                        "Clusters the KDC refused to issue, by reason", ["reason"],
                                        registry=self.registry)
        self.refused = Counter("kerb_jupyter_broker_refused", "Requests refused, by reason", ["reason"],
                               registry=self.registry)
        self.latency = Histogram("kerb_jupyter_broker_request_seconds", "Time to answer POST /v1/credentials",
                                 ["outcome"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.kdc = Histogram("kerb_jupyter_broker_kdc_seconds", "S4U round trips (s4u2self, s4u2proxy)", ["step"],
                             registry=self.registry, buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))


class Broker:
    """The service's state, shared by its handlers; collaborators are injectable (store, issuer, HTTP client)."""

    def __init__(self, settings: BrokerSettings, *, store: Store | None = None, issuer: Issuer | None = None,
                 http: tornado.httpclient.AsyncHTTPClient | None = None) -> None:
        self.settings = settings
        self.policy = PolicyHolder(settings)
        self.store = store or make_store(settings.store)
        self.issuer = issuer or Issuer(settings.service_principal, settings.keytab)
        # Its own client: tornado's shared one allows only 10 requests in flight; the rest wait in its queue, and
        # those still waiting after sts.timeout fail with "Timeout in request queue" (a 503 below).
        self.http = http or tornado.httpclient.AsyncHTTPClient(force_instance=True,
                                                               max_clients=settings.sts_max_clients)
        self.audit = AuditLog(settings.audit_log)
        self.outages = OutageLog()
        self.metrics = Metrics()
        if hasattr(self.store, "collector"):  # RedisStore: store_up, store_failures, store_outages
            self.metrics.registry.register(self.store.collector())
        self.groups = GroupDirectory(settings.ldap, self.store) if settings.ldap else None
        # A memory store forgets the signatures it saw when the broker restarts: requests signed before this
        # second are refused (SigV4 dates have one-second resolution). A Redis store remembers them itself.
        self.not_before = float(int(time.time())) if isinstance(self.store, MemoryStore) else None

    def application(self) -> tornado.web.Application:
        return tornado.web.Application([
            (r"/v1/credentials", CredentialsHandler, {"broker": self}),
            (r"/healthz", HealthHandler, {"broker": self}),
            (r"/metrics", MetricsHandler, {"broker": self}),
        ])

    def listen(self) -> tornado.httpserver.HTTPServer:
        s = self.settings
        ssl_ctx = None
        if s.tls_cert and s.tls_key:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ssl_ctx.load_cert_chain(str(s.tls_cert), str(s.tls_key))
        # Bodies up to max_body are read, larger ones (up to a hard cap, streamed and dropped) get a 413 with an
        # audit record; past the cap tornado closes the connection.
        server = tornado.httpserver.HTTPServer(self.application(), ssl_options=ssl_ctx, max_body_size=body_cap(s),
                                               body_timeout=10, idle_connection_timeout=60)
        server.listen(s.port, address=s.address)
        return server

    async def _limit(self, key: str, limit: tuple[int, float], reason: str) -> None:
        if not await self.store.hit(key, limit[0], limit[1]):
            raise Refused(429, reason, f"rate limit {limit[0]} per {limit[1]:.0f} s reached for {key}")

    async def authenticate(self, body: bytes) -> Caller:
        try:
            doc = json.loads(body)
        except ValueError:
            raise Refused(401, "malformed", "the body is not JSON") from None
        try:
            req = check_request(parse_payload(doc), audience=self.settings.audience, sts_host=self.settings.sts_host,
                                region=self.settings.sts_region, not_before=self.not_before)
        except AuthError as err:
            raise Refused(401, err.code, str(err)) from None
        if not await self.store.first_use("sig:" + req.signature, 2 * 300 + 60):
            raise Refused(401, "replay", "this signed request was used before")
        headers = {k: v for k, v in req.headers.items() if k != "content-length"}
        try:
            resp = await self.http.fetch(tornado.httpclient.HTTPRequest(
                self.settings.sts_endpoint, method="POST", headers=headers, body=req.body,
                request_timeout=self.settings.sts_timeout, connect_timeout=self.settings.sts_timeout,
                follow_redirects=False), raise_error=False)
        except (OSError, asyncio.TimeoutError, tornado.httpclient.HTTPClientError) as err:
            # refused, reset, TLS, timed out, or queued past sts.timeout behind sts.max_clients requests in flight
            raise Refused(503, "sts_unavailable", f"cannot reach STS: {type(err).__name__}: {str(err)[:160]}",
                          public="the broker cannot reach AWS STS") from None
        if resp.code == 599:
            raise Refused(503, "sts_unavailable", f"STS did not answer: {resp.error}",
                          public="the broker cannot reach AWS STS")
        self.outages.recovered("sts_unavailable")
        try:
            return parse_caller(resp.code, resp.body or b"")
        except AuthError as err:
            raise Refused(401, err.code, str(err)) from None

    async def decide(self, caller: Caller, source: str) -> Decision:
        lookup = self.groups.lookup if self.groups else None
        rename = self.groups.renames if self.groups else False
        try:
            decision = await self.policy.policy.decide(caller, source, lookup, rename=rename)
        except Denied as err:
            raise Refused(403, err.code, str(err)) from None
        except KerbJupyterError as err:
            if err.code == "ldap_unavailable":
                raise Refused(503, err.code, str(err), public="the broker cannot reach the directory") from None
            raise
        self.outages.recovered("ldap_unavailable")
        return decision

    async def issue(self, decision: Decision, record: dict[str, Any]) -> dict[str, Any]:
        """Issue the decision's clusters; records what was issued and refused in ``record``. Raises Refused."""
        try:
            issued = await asyncio.to_thread(self.issuer.issue, decision.principal, decision.clusters,
                                             decision.lifetime)
        except KdcUnreachableError as err:
            raise Refused(503, "kdc_unreachable", str(err), public="the broker cannot reach the KDC") from None
        except IdentityError as err:
            raise Refused(403, err.code, str(err)) from None
        except (CredentialsRejectedError, TicketError) as err:
            raise Refused(503, err.code, str(err), public="the broker could not get tickets from the KDC") from None
        self.outages.recovered("kdc_unreachable")
        for step, seconds in issued.timings.items():
            self.metrics.kdc.labels("s4u2self" if step == "s4u2self" else "s4u2proxy").observe(seconds)
        refused = {n: r.as_dict() for n, r in sorted(issued.refused.items())}
        record.update(clusters=sorted(issued.clusters), refused=refused)
        for name, r in sorted(issued.refused.items()):
            self.metrics.clusters_refused.labels(r.reason).inc()
            log.warning("broker: request %s: %s refused for %s (%s): %s", record["request_id"], name,
                        issued.principal, r.reason, r.message)
        if not issued.clusters:
            reason = ",".join(sorted({r.reason for r in issued.refused.values()}))
            raise Refused(403, reason, f"the KDC refused every cluster for {issued.principal}", refused=refused)
        spns = decision.clusters
        return {
            "principal": issued.principal,
            "clusters": {n: {"spn": spns[n], "expires": end} for n, end in issued.clusters.items()},
            "refused": refused,
            "expires": min(issued.clusters.values()),
            "cache": base64.b64encode(issued.cache).decode(),
        }

    async def handle(self, body: bytes, source: str, request_id: str) -> dict[str, Any]:
        """One credentials request; raises Refused. Audits every outcome exactly once."""
        limits = self.settings.limits
        record: dict[str, Any] = {"request_id": request_id, "source": source}
        try:
            await self._limit("src:" + source, limits.per_source, "rate_limited_source")
            self.outages.recovered("store_unavailable")
            caller = await self.authenticate(body)
            record["caller_arn"] = caller.arn
            await self._limit("arn:" + caller.arn, limits.per_arn, "rate_limited_arn")
            decision = await self.decide(caller, source)
            record.update(principal=decision.principal, clusters=sorted(decision.clusters), rule=decision.rule)
            await self._limit("principal:" + decision.principal, limits.per_principal, "rate_limited_principal")
            await self._limit("issued:" + decision.principal, (limits.issues_per_principal_hour, 3600.0),
                              "issue_cap")
            answer = await self.issue(decision, record)
            answer["caller_arn"] = caller.arn
        except StoreUnavailable as err:
            self._audit(record, "refused", err.code, str(err))
            raise Refused(503, err.code, str(err), public="the broker's store is unavailable") from None
        except Refused as err:
            self._audit(record, "refused", err.reason, err.detail)
            raise
        except Exception as err:  # a bug must still leave its audit record, and never a traceback to the caller
            log.exception("broker: request %s failed unexpectedly", request_id)
            self._audit(record, "refused", "internal_error", type(err).__name__)
            raise Refused(500, "internal_error", type(err).__name__) from None
        self._audit(record, "issued", "partial" if answer["refused"] else "ok", "")
        return answer

    def oversized(self, size: int, source: str, request_id: str) -> None:
        """Audit a request refused for its body size (raises Refused when the audit log cannot be written)."""
        record = {"request_id": request_id, "source": source}
        self._audit(record, "refused", "body_too_large", f"{size} bytes, over limits.max_body "
                    f"{self.settings.limits.max_body}")

    def _audit(self, record: dict[str, Any], decision: str, reason: str, detail: str) -> None:
        if decision == "issued":
            self.metrics.issued.inc()
        elif reason in OUTAGES:  # the caller is not at fault: one line per outage, not one per request
            self.metrics.refused.labels(reason).inc()
            self.outages.refused(reason, record["request_id"], detail)
        else:
            self.metrics.refused.labels(reason).inc()
            log.warning("broker: request %s from %s refused (%s): %s", record["request_id"], record["source"],
                        reason, detail)
        try:
            self.audit.record(decision=decision, reason=reason, **record)
        except OSError as err:
            log.error("broker: cannot write the audit log: %s", err.strerror)
            raise Refused(503, "audit_unavailable", "the audit log cannot be written",
                          public="the broker cannot write its audit log") from None

    async def close(self) -> None:
        self.http.close()
        await self.store.close()


_GENERIC = {401: "unauthenticated", 403: "forbidden", 413: "too_large", 429: "rate_limited"}


def body_cap(settings: BrokerSettings) -> int:
    """The most a request body may be before the connection is closed unanswered (413 below it)."""
    return max(16 * settings.limits.max_body, 1 << 20)


class _Base(tornado.web.RequestHandler):
    def initialize(self, broker: Broker) -> None:
        self.broker = broker

    def set_default_headers(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Content-Type-Options", "nosniff")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"error": _GENERIC.get(status_code, "error")})


@tornado.web.stream_request_body
class CredentialsHandler(_Base):
    """Streams the body: keeps at most ``max_body`` bytes, counts the rest, refuses an oversized one with 413."""

    def prepare(self) -> None:
        self._body = bytearray()
        self._size = 0

    def data_received(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size <= self.broker.settings.limits.max_body:
            self._body += chunk

    async def post(self) -> None:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        outcome = "issued"
        try:
            if self._size > self.broker.settings.limits.max_body:
                outcome = "body_too_large"
                self.broker.oversized(self._size, self.request.remote_ip or "?", request_id)
                self.set_status(413)
                self.finish({"error": "too_large", "request_id": request_id,
                             "message": f"the request body is over {self.broker.settings.limits.max_body} bytes"})
                return
            answer = await self.broker.handle(bytes(self._body), self.request.remote_ip or "?", request_id)
        except Refused as err:
            outcome = err.reason
            self.set_status(err.status)
            doc: dict[str, Any] = {"error": _GENERIC.get(err.status, err.reason), "request_id": request_id}
            if err.status >= 500:
                doc["message"] = err.public or "the broker cannot issue tickets right now"
            if err.refused is not None:
                doc["refused"] = err.refused
            self.finish(doc)
            return
        finally:
            kind = "issued" if outcome == "issued" else "refused"
            self.broker.metrics.latency.labels(kind).observe(time.perf_counter() - started)
        answer["request_id"] = request_id
        self.finish(answer)


class HealthHandler(_Base):
    async def get(self) -> None:
        try:
            await self.broker.store.ping()
        except StoreUnavailable:
            self.set_status(503)
            self.finish({"status": "store_unavailable"})
            return
        error = self.broker.policy.last_error
        self.finish({"status": "ok", "policy_rules": len(self.broker.policy.policy.rules),
                     "policy_reload_error": error is not None,
                     "policy_error": None if error is None else f"the new policy was refused, the previous one stays "
                                                                 f"in force: {error[:300]}"})


class MetricsHandler(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4")
        self.finish(generate_latest(self.broker.metrics.registry))


def run(config_path: str) -> None:
    """``kerb-jupyter broker --config broker.json``: serve until SIGTERM/SIGINT; SIGHUP reloads the policy.

    Raises ConfigError before listening when the configuration is invalid.
    """
    import signal

    from .settings import load_broker_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_broker_settings(config_path)

    async def main() -> None:
        broker = Broker(settings)
        server = broker.listen()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, broker.policy.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        scheme = "https" if settings.tls_cert else "http"
        log.info("kerb-jupyter broker %s listening on %s://%s:%d (audience %s, %d policy rules)",
                 settings.service_principal, scheme, settings.address, settings.port, settings.audience,
                 len(settings.policy.rules))
        print(f"kerb-jupyter broker listening on {scheme}://{settings.address}:{settings.port}", flush=True)
        await stop.wait()
        server.stop()
        await server.close_all_connections()
        await broker.close()

    asyncio.run(main())
