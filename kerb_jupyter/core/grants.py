"""Which clusters the broker granted and which it refused (and why): read from the shared cache's service tickets
and the keeper's ``refused`` map in state.json, by the kernel, the server and the doctor alike."""

from __future__ import annotations

import re
from typing import Any

from .config import ClusterConfig
from .errors import TicketError
from .tickets import TicketInfo

REASON_CODES = ("user_not_delegable", "account_disabled", "service_not_allowed", "broker_not_trusted",
                "unknown_principal", "service_unknown", "kdc_refused")  # the broker's; another is shown as sent


_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")


def one_line(value: Any, limit: int = 300) -> str:
    """A value from the broker as one printable line (no control characters, no newlines), at most ``limit``."""
    text = " ".join(value.split()) if isinstance(value, str) else ""
    return "".join(ch for ch in text if ch.isprintable())[:limit]


def parse_refused(value: Any) -> dict[str, dict[str, str]]:
    """The broker's ``refused`` map, checked where it enters: cluster -> {"reason": code, "message": one line}.

    Anything malformed is dropped or replaced (a reason that is not a short identifier becomes ``refused``); at most
    64 clusters are kept."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, dict[str, str]] = {}
    for name, item in list(value.items())[:64]:
        cluster = one_line(name, 80)
        if not cluster or not isinstance(item, dict):
            continue
        reason = item.get("reason")
        code = reason if isinstance(reason, str) and _REASON.fullmatch(reason) else "refused"
        out[cluster] = {"reason": code, "message": one_line(item.get("message")) or f"refused by the broker ({code})"}
    return out


def describe_refused(refused: dict[str, dict[str, str]]) -> str:
    """``analytics: <message> (reason); finance: ...``, in name order."""
    return "; ".join(f"{name}: {r['message']} ({r['reason']})" for name, r in sorted(refused.items()))


def grant_problem(info: TicketInfo, cluster: ClusterConfig, refused: Any = None) -> tuple[str, str] | None:
    """For a cache of service tickets only (from the broker): None if it holds one for ``cluster``, else
    (code, one-line message). ``refused``: the keeper's ``refused`` map (from state.json), whose reason is named."""
    if not info.services:
        return None
    wanted = f"{cluster.krbsrvname}/{cluster.host}".lower()
    if any(spn.rsplit("@", 1)[0].lower() == wanted for spn, _ in info.services):
        return None
    reason = parse_refused(refused).get(cluster.name)
    if reason is not None:
        return "cluster_refused", (f"the broker refused cluster {cluster.name!r} ({wanted}): {reason['message']} "
                                   f"({reason['reason']})")
    granted = ", ".join(spn for spn, _ in info.services)
    return "not_granted", (f"the broker did not grant a ticket for cluster {cluster.name!r} ({wanted}); "
                           f"granted: {granted}")


def require_grant(info: TicketInfo, cluster: ClusterConfig, state: dict[str, Any] | None = None) -> None:
    """Raise TicketError (one line, the broker's reason when it refused the cluster) when a broker cache holds no
    ticket for ``cluster``. ``state``: the keeper's snapshot (state.json), for its ``refused`` map."""
    problem = grant_problem(info, cluster, (state or {}).get("refused"))
    if problem is not None:
        raise TicketError(problem[1], code=problem[0])
