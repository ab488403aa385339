"""Event-loop lag in a real Jupyter server caused by a renewal, a Secrets Manager acquisition and a cluster check.

    .venv/bin/python benchmarks/bench_lag.py [--clients 50] [--events 10]

Starts a sandbox (MIT KDC + PostgreSQL), a moto server holding alice's keytab in Secrets Manager, and a real
``jupyter server`` with kerb_jupyter (source: ``secretsmanager_keytab``) plus this file as a tiny server extension:
a probe that sleeps 1 ms in a loop on the server's event loop and records how late it wakes up. While
``--clients`` keep-alive clients poll ``GET /kerb-jupyter/api/status`` (and once with no clients), each event is
triggered ``--events`` times: ``POST api/renew`` (renewal), removing the cache then ``POST api/renew`` (acquisition
from Secrets Manager), ``POST api/clusters/bench/check``. For each, the probe's worst lag in the window holding
the event is compared with a window of the same length without one. Results: a Markdown table, and
benchmarks/results/lag.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOKEN = "bench-lag-token"  # noqa: S105  # a throwaway server on loopback
WINDOW = 0.6  # seconds of probe samples per window


# -- the probe: loaded into the Jupyter server as the extension "bench_lag" ---------------------------------------
def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "bench_lag"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.base.handlers import JupyterHandler
    from tornado import web
    from tornado.ioloop import IOLoop

    if os.environ.get("BENCH_SWITCH_INTERVAL"):  # to test what limits the worst callback: the GIL hand-over
        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    if os.environ.get("BENCH_SCOPED_SWITCH") == "0":  # the code before: no lower switch interval during events
        from kerb_jupyter.server import threads

        threads.SWITCH_INTERVAL = sys.getswitchinterval()
    samples: list[float] = []
    longest: dict[str, Any] = {"s": 0.0, "what": ""}
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:  # every callback the loop runs, timed
        started = time.perf_counter()
        run(handle)
        took = time.perf_counter() - started
        if took > longest["s"]:
            longest.update(s=took, what=repr(getattr(handle, "_callback", handle))[:100])

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(0.001)
            samples.append(loop.time() - started - 0.001)

    class LagHandler(JupyterHandler):
        @web.authenticated
        def get(self) -> None:  # the lags since the last call, then start over
            got = sorted(samples)
            samples.clear()
            n = len(got)
            doc = {"n": n, "max_ms": got[-1] * 1000 if n else 0, "p99_ms": got[int(n * 0.99)] * 1000 if n else 0,
                   "callback_ms": longest["s"] * 1000, "callback": longest["what"]}
            longest.update(s=0.0, what="")
            self.finish(doc)

    IOLoop.current().add_callback(lambda: asyncio.ensure_future(probe()))
    serverapp.web_app.add_handlers(".*$", [(serverapp.base_url + "bench-lag", LagHandler)])


# -- the run ----------------------------------------------------------------------------------------------------------
def start_moto(keytab: bytes) -> tuple[Any, int]:
    import boto3
    from moto.server import ThreadedMotoServer

    from kerb_jupyter.sandbox.procs import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{port}",
                          aws_access_key_id="testing", aws_secret_access_key="testing")  # noqa: S106
    client.create_secret(Name="kerberos/alice", SecretBinary=keytab)
    return server, port


async def measure(base: str, clients: int, events: int, cache: Path) -> dict[str, Any]:
    from tornado.httpclient import AsyncHTTPClient

    headers = {"Authorization": f"token {TOKEN}"}
    pollers = AsyncHTTPClient(force_instance=True, max_clients=max(clients, 1))
    control = AsyncHTTPClient(force_instance=True, max_clients=4)
    stop = asyncio.Event()
    done = [0]

    async def poll() -> None:
        while not stop.is_set():
            await pollers.fetch(f"{base}kerb-jupyter/api/status", headers=headers)
            done[0] += 1

    async def lag() -> dict[str, float]:
        return dict(json.loads((await control.fetch(f"{base}bench-lag", headers=headers)).body))

    async def post(path: str) -> None:
        await control.fetch(f"{base}kerb-jupyter/api/{path}", method="POST", body=b"", headers=headers)

    async def renewal() -> None:
        await post("renew")

    async def acquisition() -> None:
        cache.unlink(missing_ok=True)
        await post("renew")

    async def cluster_check() -> None:
        await post("clusters/bench/check")

    tasks = [asyncio.ensure_future(poll()) for _ in range(clients)]
    await asyncio.sleep(2)  # warm up
    out: dict[str, Any] = {}
    started, before = time.monotonic(), done[0]
    for name, trigger in (("renewal", renewal), ("acquisition", acquisition), ("cluster_check", cluster_check)):
        quiet, busy, took = [], [], []
        for _ in range(events):
            await lag()
            await asyncio.sleep(WINDOW)
            quiet.append(await lag())
            t0 = time.perf_counter()
            await trigger()
            took.append(time.perf_counter() - t0)
            await asyncio.sleep(max(WINDOW - took[-1], 0.05))
            busy.append(await lag())
        out[name] = {"event_ms": statistics.median(took) * 1000,
                     "quiet_max_ms": statistics.median(w["max_ms"] for w in quiet),
                     "event_max_ms": statistics.median(w["max_ms"] for w in busy),
                     "event_worst_ms": max(w["max_ms"] for w in busy),
                     "quiet_p99_ms": statistics.median(w["p99_ms"] for w in quiet),
                     "event_p99_ms": statistics.median(w["p99_ms"] for w in busy),
                     "quiet_callback_ms": statistics.median(w["callback_ms"] for w in quiet),
                     "event_callback_ms": statistics.median(w["callback_ms"] for w in busy),
                     "event_callback_worst_ms": max(w["callback_ms"] for w in busy),
                     "event_callback_worst": max(busy, key=lambda w: w["callback_ms"])["callback"]}
    out["status_requests_per_s"] = (done[0] - before) / (time.monotonic() - started)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    pollers.close()
    control.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--events", type=int, default=10)
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval() in the server (default 0.005)")
    parser.add_argument("--no-scoped-switch", action="store_true",
                        help="keep the switch interval while blocking work runs (threads.SWITCH_INTERVAL: the code "
                             "before issue 20), to compare")
    args = parser.parse_args()

    from kerb_jupyter.sandbox import Sandbox
    from kerb_jupyter.sandbox.procs import free_port, wait_for_port

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="kerb-lag-") as tmp, Sandbox(Path(tmp) / "sb", clusters=("bench",)) as sb:
        moto, moto_port = start_moto(sb.keytab.read_bytes())
        state = Path(tmp) / "state"
        config = {"principal": sb.principal, "state_dir": str(state),
                  "source": {"type": "secretsmanager_keytab", "secret_id": "kerberos/{user}", "region": "us-east-1"},
                  "clusters": {"bench": {**sb.cluster_config("bench"), "gssencmode": "disable"}}}
        (Path(tmp) / "kj.json").write_text(json.dumps(config))
        port = free_port()
        env = dict(os.environ, **{**sb.env, "KERB_JUPYTER_CONFIG": str(Path(tmp) / "kj.json")},
                   AWS_ENDPOINT_URL=f"http://127.0.0.1:{moto_port}", AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",  # noqa: S106
                   PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                   JUPYTER_RUNTIME_DIR=str(Path(tmp) / "runtime"),
                   BENCH_SWITCH_INTERVAL=str(args.switch_interval or ""),
                   BENCH_SCOPED_SWITCH="0" if args.no_scoped_switch else "1")
        log = open(Path(tmp) / "server.log", "wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", f"--port={port}", "--ip=127.0.0.1", "--no-browser",
             "--allow-root", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp}",
             "--ServerApp.jpserver_extensions={'kerb_jupyter': True, 'bench_lag': True}",
             "--KerbJupyterApp.renew_min_interval=0", "--KerbJupyterApp.check_min_interval=0"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if not wait_for_port(port, None, 60):
                raise SystemExit(f"jupyter server did not start: {(Path(tmp) / 'server.log').read_text()[-2000:]}")
            time.sleep(2)
            base = f"http://127.0.0.1:{port}/"
            cache = state / "krb5cc"
            for clients in dict.fromkeys((0, args.clients)):
                print(f"{clients} clients ...", file=sys.stderr)
                results[f"clients={clients}"] = asyncio.run(measure(base, clients, args.events, cache))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
            moto.stop()
            log.close()
        results["server_log_errors"] = [line for line in (Path(tmp) / "server.log").read_text().splitlines()
                                        if "Traceback" in line or " E " in line][:10]
    results["load_after"] = os.getloadavg()
    report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    lines = [f"load average before {results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f}; "
             f"{args.events} events of each kind; switch interval {args.switch_interval or 0.005} s; scoped "
             f"{'off' if args.no_scoped_switch else 'on'}", "",
             "| clients | event | event took ms | longest callback without event ms | longest callback with event "
             "ms (median / max) | probe lag max without / with ms | probe p99 without / with ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key, group in results.items():
        if not key.startswith("clients="):
            continue
        for name, r in group.items():
            if not isinstance(r, dict):
                continue
            lines.append(f"| {key.split('=')[1]} | {name} | {r['event_ms']:.1f} | {r['quiet_callback_ms']:.2f} | "
                         f"{r['event_callback_ms']:.2f} / {r['event_callback_worst_ms']:.2f} | "
                         f"{r['quiet_max_ms']:.1f} / {r['event_max_ms']:.1f} | "
                         f"{r['quiet_p99_ms']:.1f} / {r['event_p99_ms']:.1f} |")
            lines.append(f"|  | (longest with {name}: `{r['event_callback_worst']}`) | | | | | |")
        lines.append(f"| {key.split('=')[1]} | (status requests/s) | {group['status_requests_per_s']:.0f} | | | | |")
    if results["server_log_errors"]:
        lines += ["", "server log errors:", *results["server_log_errors"]]
    print("\n".join(lines))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "lag.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
