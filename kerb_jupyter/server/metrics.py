"""Prometheus metrics on jupyter-server's /metrics: seconds until expiry, renewals, failures.

A collector reads the keeper's state at scrape time, so nothing is updated on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY as _REGISTRY
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:  # jupyter-server ships prometheus_client; be quiet where it does not
    _REGISTRY = None  # type: ignore[assignment]
REGISTRY: Any = _REGISTRY


class KeeperCollector:
    def __init__(self, keeper: Any) -> None:
        self.keeper = keeper

    def collect(self) -> Iterator[Any]:
        s = self.keeper.state
        left = GaugeMetricFamily("kerb_jupyter_ticket_seconds_remaining",
                                 "Seconds until the shared Kerberos ticket expires (negative: expired)")
        left.add_metric([], (s.expires_at - time.time()) if s.expires_at else float("nan"))
        yield left
        renewals = CounterMetricFamily("kerb_jupyter_renewals", "Successful ticket renewals and acquisitions",
                                       labels=["kind"])
        renewals.add_metric(["renewed"], s.renewals)
        renewals.add_metric(["acquired"], s.acquisitions)
        yield renewals
        failures = CounterMetricFamily("kerb_jupyter_renewal_failures", "Failed renewal or acquisition attempts")
        failures.add_metric([], s.failures)
        yield failures


def register(keeper: Any) -> KeeperCollector | None:
    if REGISTRY is None:
        return None
    collector = KeeperCollector(keeper)
    REGISTRY.register(collector)
    return collector


def unregister(collector: KeeperCollector | None) -> None:
    if collector is not None and REGISTRY is not None:
        REGISTRY.unregister(collector)
