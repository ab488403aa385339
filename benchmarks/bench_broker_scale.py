"""Load on the credential broker (#9): 1 and 2 instances sharing one Redis, many concurrent callers, on the sandbox.

    .venv/bin/python benchmarks/bench_broker_scale.py [--seconds 60] [--callers 200] [--users 20] [--replays 0.05]

Starts the broker sandbox (LDAP-backed MIT KDC, two PostgreSQL clusters, moto STS with SigV4 verification), a
private redis-server and 1, then 2, ``kerb-jupyter broker`` processes with ``"store": "redis://..."`` and limits
high enough not to interfere. ``--callers`` asyncio callers, round-robin over the instances, each sign a fresh
GetCallerIdentity request (a pool of ``--users`` users) and POST it; a fraction ``--replays`` re-send a request
already used, which must be refused (401 replay) whichever instance gets it. Reports requests/s, issued/s,
p50/p99 latency of issued requests, every non-intended answer as an error, the CPU seconds each process used
(what limits the run) and the machine's load average. Writes benchmarks/results/broker_scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HIGH = 10**9


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Brokers:
    """``n`` broker processes with the sandbox's configuration, the Redis store and high limits."""

    def __init__(self, sb: Any, redis_url: str, n: int, root: Path) -> None:
        from kerb_jupyter.sandbox.procs import free_port, tail, wait_for_port

        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: list[str] = []
        base = json.loads(sb.broker_config.read_text())
        limits = {"per_principal": [HIGH, 60], "per_arn": [HIGH, 60], "per_source": [HIGH, 60],
                  "issues_per_principal_hour": HIGH}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KRB5CCNAME", "KERB_JUPYTER"))}
        env["KRB5_CONFIG"] = str(sb.realm.krb5_conf)
        for i in range(n):
            d = root / f"broker-{n}-{i}"
            d.mkdir(mode=0o700)
            port = free_port()
            doc = {**base, "store": redis_url, "limits": limits, "audit_log": str(d / "audit.jsonl"),
                   "listen": {"address": "127.0.0.1", "port": port}}
            (d / "broker.json").write_text(json.dumps(doc))
            with open(d / "broker.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-c", "import sys; from kerb_jupyter.cli import main; sys.exit(main())",
                     "broker", "--config", str(d / "broker.json")], stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True)
            self.procs.append(proc)
            if not wait_for_port(port, proc, 30):
                self.stop()
                raise SystemExit(f"broker {i} did not start: {tail((d / 'broker.log').read_text())}")
            self.urls.append(f"http://127.0.0.1:{port}/v1/credentials")
        self.logs = [root / f"broker-{n}-{i}" / "broker.log" for i in range(n)]

    def problems(self, limit: int = 8) -> list[str]:
        """Distinct ERROR lines and exception lines from the brokers' logs (timestamps cut), for the report."""
        seen: dict[str, int] = {}
        for log in self.logs:
            for line in log.read_text(errors="replace").splitlines():
                if " ERROR " in line or line.startswith(("Traceback", "  File")) or "Error:" in line:
                    key = line.split(" ", 2)[-1][:240]
                    seen[key] = seen.get(key, 0) + 1
        return [f"{n}x {line}" for line, n in sorted(seen.items(), key=lambda kv: -kv[1])[:limit]]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)


async def load(urls: list[str], creds: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

    from kerb_jupyter.core.signing import sign_request
    from kerb_jupyter.sandbox.broker import AUDIENCE
    from kerb_jupyter.sandbox.sts import REGION

    client = AsyncHTTPClient(force_instance=True, max_clients=args.callers)
    deadline = time.monotonic() + args.seconds
    issued: list[float] = []
    refused_ok: list[float] = []
    errors: dict[str, int] = {}
    used: list[bytes] = []
    counter = 0

    async def caller(k: int) -> None:
        nonlocal counter
        rng = random.Random(k)
        while time.monotonic() < deadline:
            counter += 1
            url = urls[counter % len(urls)]
            replay = bool(used) and rng.random() < args.replays
            body = rng.choice(used) if replay else json.dumps(
                sign_request(rng.choice(creds), REGION, args.sts_url, AUDIENCE)).encode()
            started = time.perf_counter()
            try:
                resp = await client.fetch(HTTPRequest(url, method="POST", body=body, request_timeout=60))
                status, answer = resp.code, json.loads(resp.body)
            except HTTPClientError as err:
                status = err.code
                answer = json.loads(err.response.body) if err.response is not None and err.response.body else {}
            except OSError as err:
                status, answer = 0, {"error": type(err).__name__}
            took = time.perf_counter() - started
            if status == 200 and not replay:
                issued.append(took)
                if len(used) < 1000:
                    used.append(body)
            elif replay and status == 401:
                refused_ok.append(took)
            else:
                key = f"{status} {answer.get('error', '?')}{' (replay sent)' if replay else ''}"
                errors[key] = errors.get(key, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(caller(k) for k in range(args.callers)))
    elapsed = time.monotonic() - started
    client.close()
    issued.sort()
    total = len(issued) + len(refused_ok) + sum(errors.values())
    return {
        "instances": len(urls), "seconds": round(elapsed, 1), "requests": total,
        "requests_per_s": round(total / elapsed, 1), "issued_per_s": round(len(issued) / elapsed, 1),
        "issued": len(issued), "replays_refused": len(refused_ok), "errors": errors,
        "p50_ms": round(1000 * statistics.median(issued), 1) if issued else None,
        "p99_ms": round(1000 * issued[int(0.99 * (len(issued) - 1))], 1) if issued else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--callers", type=int, default=200)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--replays", type=float, default=0.05)
    ap.add_argument("--instances", default="1,2", help="comma-separated instance counts to run, in order")
    args = ap.parse_args()

    import redis
    from botocore.credentials import Credentials

    from kerb_jupyter.sandbox.broker import BrokerSandbox
    from kerb_jupyter.sandbox.redis_server import RedisServer
    from kerb_jupyter.sandbox.sts import SSO_ROLE

    results = []
    with tempfile.TemporaryDirectory(prefix="kj-bench-broker-") as tmp:
        root = Path(tmp)
        sb = BrokerSandbox(root / "sb")
        srv = RedisServer(root / "redis")
        try:
            sb.start()
            sb.stop_broker()
            srv.start()
            os.environ["KRB5_CONFIG"] = str(sb.realm.krb5_conf)
            users = [f"user{i:03d}" for i in range(args.users)]
            for u in users:
                sb.realm.add_user(u, groups=["analysts"])
            sessions = [sb.sts.session(SSO_ROLE, u) for u in users]
            creds = [Credentials(s["aws_access_key_id"], s["aws_secret_access_key"], s["aws_session_token"])
                     for s in sessions]
            args.sts_url = sb.sts.url + "/"
            daemons = {"kdc": sb.realm.proc, "slapd": sb.realm.slapd.proc, "moto": sb.sts.proc, "redis": srv.proc}
            for n in (int(x) for x in args.instances.split(",")):
                redis.Redis.from_url(srv.url).flushdb()
                brokers = Brokers(sb, srv.url, n, root)
                try:
                    before = {k: cpu_seconds(p.pid) for k, p in daemons.items() if p is not None}
                    own = os.times()
                    result = asyncio.run(load(brokers.urls, creds, args))
                    cpu = {k: round(cpu_seconds(daemons[k].pid) - v, 1) for k, v in before.items()}  # type: ignore[union-attr]
                    cpu["brokers"] = round(sum(cpu_seconds(p.pid) for p in brokers.procs), 1)
                    cpu["load generator"] = round(sum(os.times()[:2]) - sum(own[:2]), 1)
                    result["cpu_seconds"] = cpu
                    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)  # the machine is shared
                    result["log_problems"] = brokers.problems()
                finally:
                    brokers.stop()
                results.append(result)
                print(json.dumps(result), flush=True)
        finally:
            srv.stop()
            sb.stop()
    print()
    loads = ", ".join(str(r["load_average_1min_at_end"]) for r in results)
    print(f"{args.callers} callers, {args.seconds:.0f} s per run, {args.replays:.0%} replays, {os.cpu_count()} cores, "
          f"1-min load average at the end of each run: {loads}")
    print("| instances | requests/s | issued/s | p50 ms | p99 ms | replays refused | errors "
          "| CPU s (brokers/kdc/slapd/moto/redis/client) |")
    print("|---:|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        c = r["cpu_seconds"]
        cpu = "/".join(str(c.get(k, "-")) for k in ("brokers", "kdc", "slapd", "moto", "redis", "load generator"))
        print(f"| {r['instances']} | {r['requests_per_s']} | {r['issued_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['replays_refused']} | {r['errors'] or 'none'} | {cpu} |")
    out = HERE / "results" / "broker_scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
