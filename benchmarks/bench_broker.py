"""The credential broker's speed (issue #8): one principal, two clusters, on a real sandbox on loopback.

    .venv/bin/python benchmarks/bench_broker.py [--runs 200] [--concurrent 50] [--requests 1000]

Starts ``BrokerSandbox`` (LDAP-backed MIT KDC, two PostgreSQL clusters, moto STS with SigV4 verification on,
the broker as its own process) and measures:
1. Issuing in the broker's code (``Issuer.issue``, in this process): total, the broker's own TGT + S4U2Self,
   and each S4U2Proxy round trip, separately.
2. One caller, sequential requests over HTTP: the whole ``POST /v1/credentials`` (checks, STS, policy, LDAP
   groups from the store's cache, S4U, audit), requests signed beforehand so signing is not counted; and moto's
   GetCallerIdentity alone, the part that real STS would replace.
3. ``--concurrent`` callers at once: issuing alone (threads, as the service runs it), and whole requests against
   the one broker process (moto, a Python server, then takes most of the time).
Prints a Markdown table and writes benchmarks/results/broker-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kerb_jupyter.broker.auth import sign_request  # noqa: E402
from kerb_jupyter.broker.issue import Issuer  # noqa: E402
from kerb_jupyter.sandbox.broker import AUDIENCE, BrokerSandbox  # noqa: E402
from kerb_jupyter.sandbox.sts import REGION, SSO_ROLE  # noqa: E402


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.2f} ms"


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def bench_issue(sb: BrokerSandbox, runs: int) -> dict[str, list[float]]:
    os.environ["KRB5_CONFIG"] = str(sb.realm.krb5_conf)
    issuer = Issuer(sb.realm.principal("broker/localhost"), sb.broker_keytab)
    clusters = {name: sb.spn(name) for name in sb.servers}
    out: dict[str, list[float]] = {"total": [], "s4u2self": []}
    for _ in range(runs):
        t0 = time.perf_counter()
        issued = issuer.issue(sb.principal, clusters, 3600)
        out["total"].append(time.perf_counter() - t0)
        for step, seconds in issued.timings.items():
            out.setdefault(step, []).append(seconds)
    return out


def signed_payloads(sb: BrokerSandbox, count: int) -> list[bytes]:
    from botocore.credentials import Credentials

    c = sb.sts.session(SSO_ROLE, sb.user)
    creds = Credentials(c["aws_access_key_id"], c["aws_secret_access_key"], c["aws_session_token"])
    return [json.dumps(sign_request(creds, REGION, sb.sts.url + "/", AUDIENCE)).encode() for _ in range(count)]


def post(url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url, data=body, method="POST")  # noqa: S310
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - our own loopback broker
        doc = json.loads(resp.read())
    assert doc["principal"] and len(doc["clusters"]) == 2, doc
    return time.perf_counter() - t0


def bench_sts(sb: BrokerSandbox, runs: int) -> list[float]:
    c = sb.sts.session(SSO_ROLE, sb.user)
    client = sb.sts.client("sts", c)
    client.get_caller_identity()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        client.get_caller_identity()
        times.append(time.perf_counter() - t0)
    return times


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemons(sb: BrokerSandbox) -> dict[str, int]:
    procs = {"broker": sb.broker_proc, "krb5kdc": sb.realm.proc, "slapd": sb.realm.slapd.proc, "moto": sb.sts.proc}
    return {name: p.pid for name, p in procs.items() if p is not None}


async def bench_issue_concurrent(sb: BrokerSandbox, requests: int, callers: int) -> list[float]:
    """The broker's own work only (S4U on threads, as the service runs it), ``callers`` at once."""
    issuer = Issuer(sb.realm.principal("broker/localhost"), sb.broker_keytab)
    clusters = {name: sb.spn(name) for name in sb.servers}
    semaphore = asyncio.Semaphore(callers)
    times: list[float] = []

    async def one() -> None:
        async with semaphore:
            t0 = time.perf_counter()
            await asyncio.to_thread(issuer.issue, sb.principal, clusters, 3600)
            times.append(time.perf_counter() - t0)

    await asyncio.gather(*(one() for _ in range(requests)))
    return times


async def bench_concurrent(url: str, bodies: list[bytes], callers: int) -> tuple[list[float], float]:
    from tornado.httpclient import AsyncHTTPClient, HTTPRequest

    AsyncHTTPClient.configure(None, max_clients=callers)
    client = AsyncHTTPClient()
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    times: list[float] = []

    async def caller() -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            resp = await client.fetch(HTTPRequest(url, method="POST", body=body, request_timeout=60))
            times.append(time.perf_counter() - t0)
            assert resp.code == 200

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return times, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="sequential runs per measurement (default 200)")
    parser.add_argument("--concurrent", type=int, default=50, help="callers at once (default 50)")
    parser.add_argument("--requests", type=int, default=1000, help="requests in the concurrent run (default 1000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kerb-jupyter-bench-broker-") as tmp:
        sb = BrokerSandbox(Path(tmp))
        try:
            sb.start()
            big = 1_000_000
            sb.write_broker_config(limits={"per_principal": [big, 60], "per_arn": [big, 60],
                                           "per_source": [big, 60], "issues_per_principal_hour": big})
            sb.stop_broker()
            sb.start_broker()
            url = sb.broker_url + "/v1/credentials"
            issue = bench_issue(sb, args.runs)
            issue_conc = asyncio.run(bench_issue_concurrent(sb, args.requests, args.concurrent))
            sts = bench_sts(sb, args.runs)
            post(url, signed_payloads(sb, 1)[0])  # warm: LDAP groups into the store's cache
            sequential = [post(url, body) for body in signed_payloads(sb, args.runs)]
            bodies = signed_payloads(sb, args.requests)
            pids = daemons(sb)
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            concurrent, wall = asyncio.run(bench_concurrent(url, bodies, args.concurrent))
            cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        finally:
            sb.stop()
    rows = [("issue, in process: total (own TGT + S4U2Self + 2 x S4U2Proxy)", ms(issue["total"])),
            ("  own TGT + S4U2Self", ms(issue["s4u2self"]))]
    rows += [(f"  S4U2Proxy {k.split(':', 1)[1]}", ms(v)) for k, v in issue.items() if k.startswith("proxy:")]
    rows += [(f"issue, in process, {args.concurrent} at once on threads, median", ms(issue_conc)),
             (f"issue, in process, {args.concurrent} at once on threads, p99", f"{p99(issue_conc) * 1000:.2f} ms"),
             ("moto GetCallerIdentity alone (stands in for STS)", ms(sts)),
             ("POST /v1/credentials, one caller, median", ms(sequential)),
             ("POST /v1/credentials, one caller, p99", f"{p99(sequential) * 1000:.2f} ms"),
             (f"POST /v1/credentials, {args.concurrent} callers, median", ms(concurrent)),
             (f"POST /v1/credentials, {args.concurrent} callers, p99", f"{p99(concurrent) * 1000:.2f} ms"),
             (f"throughput with {args.concurrent} callers", f"{len(concurrent) / wall:.0f} requests/s")]
    rows += [(f"  CPU per request during that run: {name}", f"{seconds / len(concurrent) * 1000:.2f} ms")
             for name, seconds in cpu.items()]
    print("| measurement | value |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "broker-latest.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
