"""`clipsearch lb-test`: the deployment topology on loopback, under load and failure.

nginx (with `docker/nginx.conf`, the file the compose deployment uses) in front of N
`clipsearch serve` processes; a bounded load of text and image queries from concurrent clients
while one replica is killed with SIGKILL and later restarted, and another gets SIGTERM (a rolling
restart) and is restarted too. Prints requests sent, succeeded, failed, latency percentiles and
each replica's share; exits non-zero if any request failed. Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOCKER = Path(__file__).resolve().parents[1] / "docker"
LB_PORT = 8080  # fixed in docker/nginx.conf


@dataclass
class Replica:
    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    events: list[str] = field(default_factory=list)

    def start(self) -> None:
        command = [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait_ready(self, timeout_s: float) -> None:
        """Until /readyz answers 200. A replica that exits or stays unready fails at once with the
        end of its log, so the cause (a taken port, a bad model path) is in the error itself."""
        try:
            wait_http(f"http://127.0.0.1:{self.port}/readyz", timeout_s, self.process)
        except RuntimeError as exc:
            tail = self.log.read_text(errors="replace").splitlines()[-15:] if self.log.exists() else []
            raise RuntimeError("\n".join([f"replica :{self.port}: {exc}; the end of its log:", *tail])) from None


def wait_http(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None,
              thread: threading.Thread | None = None) -> None:
    """Poll `url` until it answers 200; RuntimeError after `timeout_s`, or as soon as the server
    behind `url`, when given (its `process`, or the `thread` it runs in), has ended."""
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before {url} answered 200")
        if thread is not None and not thread.is_alive():
            raise RuntimeError(f"the server stopped before {url} answered 200 (its log says why)")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")


def free_port_block(count: int, low: int = 20000, high: int = 32000) -> int:
    """The first port of `count` consecutive ports that nothing listens on, from below the kernel's
    usual ephemeral range (32768+), where a client's source port could otherwise take one."""
    import random
    import socket

    starts = list(range(low, high - count, count))
    random.Random().shuffle(starts)  # two runs at once rarely pick the same block; global state untouched
    for start in starts:
        sockets: list[socket.socket] = []
        try:
            for port in range(start, start + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


def start_nginx(work: Path, ports: list[int]) -> subprocess.Popen[bytes]:
    """nginx with a byte-identical copy of docker/nginx.conf and an upstream list for `ports`."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise FileNotFoundError("nginx not found: apt-get install nginx-light (make install does)")
    prefix = work / "nginx"
    for sub in ("conf", "tmp", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DOCKER / "nginx.conf", prefix / "conf" / "nginx.conf")
    (prefix / "conf" / "upstream.conf").write_text(
        "".join(f"server 127.0.0.1:{p} max_fails=2 fail_timeout=5s;\n" for p in ports))
    command = [nginx, "-p", f"{prefix}/", "-c", str(prefix / "conf" / "nginx.conf"), "-g", "daemon off;"]
    check = subprocess.run([*command[:-2], "-t"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected the config: {check.stderr.strip()}")
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=(work / "nginx.log").open("wb"))


async def _load(base: str, clients: int, duration_s: float, image_share: float) -> dict[str, Any]:
    import random

    import httpx
    import numpy as np

    from app.bench import QUERIES, _image_payloads

    images = _image_payloads()
    statuses: Counter[int] = Counter()
    served_by: Counter[str] = Counter()
    latencies: list[float] = []
    failures: list[str] = []
    deadline = time.perf_counter() + duration_s

    async def loop(seed: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            if rng.random() < image_share:
                path, body = "/v1/search/image", {"image_base64": rng.choice(images), "k": 5}
            else:
                path, body = "/v1/search/text", {"query": rng.choice(QUERIES), "k": 5}
            started = time.perf_counter()
            try:
                response = await client.post(path, json=body)
                status = response.status_code
                served_by[response.headers.get("x-upstream", "?").split(",")[-1].strip()] += 1
                if status != 200:
                    failures.append(f"{status} {response.text[:200]}")
            except httpx.HTTPError as exc:
                status = 0
                failures.append(f"{type(exc).__name__}: {exc}")
            latencies.append(time.perf_counter() - started)
            statuses[status] += 1

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
        await asyncio.gather(*(loop(i, client) for i in range(clients)))
    elapsed = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    ok = statuses.get(200, 0)
    return {
        "sent": len(latencies), "succeeded": ok, "failed": len(latencies) - ok, "seconds": round(elapsed, 1),
        "qps": round(ok / elapsed, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "statuses": dict(statuses), "share": {k: round(v / max(1, len(latencies)), 3) for k, v in served_by.items()},
        "first_failures": failures[:5],
    }


async def _faults(replicas: list[Replica], duration_s: float, startup_s: float) -> list[str]:
    """SIGKILL replica 0 at 15%, restart it at 35%; SIGTERM replica 1 at 60%, restart it when it
    has exited (a rolling restart). Returns what happened, with times."""
    log: list[str] = []
    t0 = time.perf_counter()

    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, t0 + fraction * duration_s - time.perf_counter()))

    def note(text: str) -> None:
        log.append(f"{time.perf_counter() - t0:5.1f} s  {text}")

    await at(0.15)
    replicas[0].signal(signal.SIGKILL)
    note(f"SIGKILL replica :{replicas[0].port}")
    await at(0.35)
    replicas[0].start()
    note(f"restarted replica :{replicas[0].port}")
    await at(0.6)
    replicas[1].signal(signal.SIGTERM)
    note(f"SIGTERM replica :{replicas[1].port}")
    process = replicas[1].process
    assert process is not None
    while process.poll() is None:
        await asyncio.sleep(0.1)
    note(f"replica :{replicas[1].port} exited with {process.returncode}")
    replicas[1].start()
    note(f"restarted replica :{replicas[1].port}")
    return log


async def _run(base: str, replicas: list[Replica], clients: int, duration_s: float, image_share: float,
               startup_s: float) -> tuple[dict[str, Any], list[str]]:
    load = asyncio.create_task(_load(base, clients, duration_s, image_share))
    faults = asyncio.create_task(_faults(replicas, duration_s, startup_s))
    report = await load
    return report, await faults


def run_lb_test(index: Path, model: str, work: Path, replicas: int, base_port: int, clients: int,
                duration_s: float, image_share: float, startup_s: float = 180) -> dict[str, Any]:
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CLIPSEARCH_INDEX_DIR": str(index.resolve()), "CLIPSEARCH_MODEL": model,
           "CLIPSEARCH_RELOAD_INTERVAL_S": "0", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(DOCKER.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    pool = [Replica(base_port + i, env, work / f"replica-{base_port + i}.log") for i in range(replicas)]
    nginx = None
    try:
        for replica in pool:
            replica.start()
        for replica in pool:
            replica.wait_ready(startup_s)
        nginx = start_nginx(work, [r.port for r in pool])
        base = f"http://127.0.0.1:{LB_PORT}"
        try:
            wait_http(f"{base}/lb-health", 20, nginx)
        except RuntimeError as exc:
            log = (work / "nginx.log").read_text(errors="replace").strip()
            raise RuntimeError(f"nginx on :{LB_PORT}: {exc}; its log: {log or '(empty)'}") from None
        report, events = asyncio.run(_run(base, pool, clients, duration_s, image_share, startup_s))
        report["events"] = events
        report["replicas"] = replicas
        report["clients"] = clients
        return report
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for replica in pool:
            if replica.process is not None and replica.process.poll() is None:
                replica.process.kill()
                replica.process.wait(10)


def _handle(args: argparse.Namespace) -> int:
    from app.bench import check_load_options

    check_load_options(args.clients, args.duration, args.image_share)
    if args.replicas < 2:  # one replica killed must leave another to take its requests
        raise ValueError(f"--replicas must be at least 2, got {args.replicas}")
    base_port = args.base_port or free_port_block(args.replicas)
    report = run_lb_test(args.index, args.model, args.work, args.replicas, base_port, args.clients,
                         args.duration, args.image_share)
    events = report.pop("events")
    print("\n".join(["fault timeline:", *("  " + e for e in events)]))
    print(json.dumps(report, indent=2))
    return 0 if report["failed"] == 0 else 1


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("lb-test", help="nginx + N replicas on loopback under load, kills, restarts")
    parser.add_argument("--index", type=Path, required=True, help="a published index directory")
    parser.add_argument("--model", default="default", help="the model the index was built with")
    parser.add_argument("--work", type=Path, default=Path("build/lb-test"), help="logs and nginx prefix")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--base-port", type=int, default=18001, help="replica ports start here (0: a free block)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--image-share", type=float, default=0.3)
    parser.set_defaults(handler=_handle)
