"""`clipsearch bench`: load a running server with concurrent clients and report what it measured.

A bounded run (duration and client count fixed up front) of text and image queries against one
server on this machine; prints requests, failures, throughput, latency percentiles and the batch
sizes the server formed (read from its /metrics). `make bench` starts a server process for it.

One load-generator process (one asyncio loop) tops out near 260 requests/s on a fast machine
(README, Benchmarks: the H200 session), so `--processes` splits the clients over several, which
start together at one wall-clock moment and whose reports are merged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np

QUERIES = ("a bird", "a piece of fruit", "a musical instrument", "a road sign", "a red car", "a flower",
           "a boat on the sea", "a dinosaur", "a Christmas decoration", "a planet", "a dog", "a house")
# --varied-texts: texts of 1 to 60 of these words, so that the server meets every text width (the
# fixed queries above are 2-5 words: a soak on them missed memory kept per text shape, README)
WORDS = ("a", "the", "bird", "fruit", "musical", "instrument", "road", "sign", "red", "car", "flower", "boat",
         "on", "sea", "dinosaur", "Christmas", "decoration", "planet", "dog", "house", "small", "with", "near")


def text_query(rng: random.Random, varied: bool = False) -> str:
    """A text query: one of QUERIES, or with `varied` a run of 1 to 60 WORDS."""
    if not varied:
        return rng.choice(QUERIES)
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))


@dataclass
class LoadReport:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    ok_latencies: list[float] = field(default_factory=list)
    shed_latencies: list[float] = field(default_factory=list)  # 429 answers: how fast excess is refused
    seconds: float = 0.0
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, server RSS)

    def as_dict(self) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        ok = np.array(self.ok_latencies) * 1000 if self.ok_latencies else np.zeros(1)
        shed = np.array(self.shed_latencies) * 1000 if self.shed_latencies else np.zeros(1)
        return {
            "sent": self.sent, "ok": self.ok, "failed": self.failed, "statuses": self.statuses,
            "seconds": round(self.seconds, 1), "qps": round(self.ok / self.seconds, 1) if self.seconds else 0,
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "accepted_p99_ms": round(float(np.percentile(ok, 99)), 1),
            "shed": len(self.shed_latencies), "shed_p99_ms": round(float(np.percentile(shed, 99)), 1),
            "server_rss_mb": self.memory_summary(),
        }

    def memory_summary(self) -> dict[str, float]:
        """Server RSS before the load, once warm (the first sample after a tenth of the run), halfway,
        at the end, and the growth after warm-up and over the second half alone: a leak grows in
        both, memory that settles (allocator arenas filling up) grows early and then stays."""
        if not self.rss_mb:
            return {}

        def first_after(seconds: float) -> float:
            return next((mb for t, mb in self.rss_mb if t >= seconds), self.rss_mb[-1][1])

        warm, halfway = first_after(self.seconds / 10), first_after(self.seconds / 2)
        end = self.rss_mb[-1][1]
        return {"before": self.rss_mb[0][1], "warm": warm, "halfway": halfway, "end": end,
                "peak": max(mb for _, mb in self.rss_mb), "growth_after_warm": round(end - warm, 1),
                "growth_second_half": round(end - halfway, 1)}

    def passed(self, allow_shed: bool = False) -> bool:
        """True when every request succeeded; with `allow_shed`, 429 refusals (load shedding under
        an overload the run provokes on purpose) do not count against it, any other failure does."""
        shed = len(self.shed_latencies) if allow_shed else 0
        return self.failed - shed == 0

    @classmethod
    def merged(cls, parts: list[LoadReport]) -> LoadReport:
        """One report of several load generators that ran at the same time (memory samples: the
        one that took them)."""
        report = cls(seconds=max((part.seconds for part in parts), default=0.0))
        for part in parts:
            report.sent, report.ok, report.failed = report.sent + part.sent, report.ok + part.ok, report.failed + part.failed
            for status, count in part.statuses.items():
                report.statuses[status] = report.statuses.get(status, 0) + count
            report.latencies += part.latencies
            report.ok_latencies += part.ok_latencies
            report.shed_latencies += part.shed_latencies
            report.rss_mb = report.rss_mb or part.rss_mb
        return report


def _image_payloads(count: int = 8) -> list[str]:
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    payloads = []
    for _ in range(count):
        image = Image.new("RGB", (160, 160), tuple(rng.randint(150, 255) for _ in range(3)))
        ImageDraw.Draw(image).ellipse((30, 30, 130, 130), fill=tuple(rng.randint(0, 200) for _ in range(3)))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        payloads.append(base64.b64encode(buffer.getvalue()).decode())
    return payloads


async def drive(base: str, clients: int, duration_s: float, image_share: float, k: int = 10,
                first_seed: int = 0, sample_memory_too: bool = True, api_key: str | None = None,
                varied_texts: bool = False) -> LoadReport:
    """`clients` concurrent loops, each sending one request at a time until `duration_s` passes.
    Client i draws its queries from seed `first_seed + i` (`text_query`). `api_key`: sent as a
    bearer token."""
    import httpx

    report = LoadReport()
    images = _image_payloads()
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(seed: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            if rng.random() < image_share:
                path, body = "/v1/search/image", {"image_base64": rng.choice(images), "k": k}
            else:
                path, body = "/v1/search/text", {"query": text_query(rng, varied_texts), "k": k}
            started = time.perf_counter()
            report.sent += 1
            try:
                response = await client.post(path, json=body)
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            elapsed = time.perf_counter() - started
            report.latencies.append(elapsed)
            report.statuses[status] = report.statuses.get(status, 0) + 1
            if status == 429:
                report.shed_latencies.append(elapsed)
            if status == 200:
                report.ok_latencies.append(elapsed)
                report.ok += 1
            else:
                report.failed += 1

    async def sample_memory(client: httpx.AsyncClient, every_s: float) -> None:
        while True:
            mb = await server_rss_mb(client)
            if mb is not None:
                report.rss_mb.append((round(time.perf_counter() - started, 1), mb))
            if time.perf_counter() >= deadline:
                return
            await asyncio.sleep(min(every_s, max(0.0, deadline - time.perf_counter())))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, headers=auth_headers(api_key)) as client:
        sampler = asyncio.create_task(sample_memory(client, max(1.0, duration_s / 20))) if sample_memory_too else None
        await asyncio.gather(*(client_loop(first_seed + i, client) for i in range(clients)))
        if sampler is not None:
            await sampler
    report.seconds = time.perf_counter() - started
    return report


async def server_rss_mb(client: Any) -> float | None:
    """The server's resident memory in MB, from its /metrics (None when it does not say)."""
    try:
        text = (await client.get("/metrics")).text
    except Exception:  # noqa: BLE001 - a missed sample is not a failed request
        return None
    found = re.search(r"^process_resident_memory_bytes ([0-9.e+]+)$", text, re.MULTILINE)
    return round(float(found.group(1)) / 2**20, 1) if found else None


def batch_sizes(metrics_text: str) -> dict[str, dict[str, float]]:
    """Mean batch size and share of batches above 1, per modality, from a /metrics page."""
    out: dict[str, dict[str, float]] = {}
    for modality in ("text", "image"):
        count = re.search(rf'clipsearch_batch_size_count{{modality="{modality}"}} ([0-9.e+]+)', metrics_text)
        total = re.search(rf'clipsearch_batch_size_sum{{modality="{modality}"}} ([0-9.e+]+)', metrics_text)
        ones = re.search(rf'clipsearch_batch_size_bucket{{le="1.0",modality="{modality}"}} ([0-9.e+]+)', metrics_text)
        if count and total and float(count.group(1)) > 0:
            batches = float(count.group(1))
            out[modality] = {"batches": batches, "mean_size": round(float(total.group(1)) / batches, 2),
                             "share_above_1": round(1 - float(ones.group(1)) / batches, 3) if ones else 0.0}
    return out


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _generator(base: str, clients: int, duration_s: float, image_share: float, first_seed: int,
               sample_memory_too: bool, start_at: float, api_key: str | None, varied_texts: bool) -> LoadReport:
    """One load-generator process: wait for the common start (wall clock: every process reads the
    same one), then drive its share of the clients."""
    time.sleep(max(0.0, start_at - time.time()))
    return asyncio.run(drive(base, clients, duration_s, image_share, first_seed=first_seed,
                             sample_memory_too=sample_memory_too, api_key=api_key, varied_texts=varied_texts))


def drive_processes(base: str, clients: int, duration_s: float, image_share: float, processes: int,
                    api_key: str | None = None, varied_texts: bool = False) -> LoadReport:
    """`drive` with the clients split as evenly as possible over `processes` generator processes."""
    if processes <= 1:
        return asyncio.run(drive(base, clients, duration_s, image_share, api_key=api_key, varied_texts=varied_texts))
    shares = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    seeds = [sum(shares[:i]) for i in range(processes)]  # every client its own query stream
    # spawned interpreters import this module in about a second: start together after that
    start_at = time.time() + 3.0
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_generator, base, share, duration_s, image_share, seed, i == 0, start_at, api_key,
                               varied_texts)
                   for i, (share, seed) in enumerate(zip(shares, seeds, strict=True))]
        return LoadReport.merged([future.result() for future in futures])


def check_load_options(clients: int, duration_s: float, image_share: float) -> None:
    """Refuse load settings that measure nothing (`bench` and `lb-test`): with no clients the
    report ended in an IndexError over zero latencies; a share of 2 sent only images unannounced."""
    if clients < 1:
        raise ValueError(f"--clients must be at least 1, got {clients}")
    if not duration_s > 0:
        raise ValueError(f"--duration must be positive (seconds), got {duration_s}")
    if not 0.0 <= image_share <= 1.0:
        raise ValueError(f"--image-share must lie in [0, 1], got {image_share}")


def _handle(args: argparse.Namespace) -> int:
    import httpx

    check_load_options(args.clients, args.duration, args.image_share)
    if not 1 <= args.processes <= args.clients:
        raise ValueError(f"--processes must be between 1 and --clients ({args.clients}), got {args.processes}")
    try:  # one clear line instead of a ConnectError traceback from every client
        httpx.get(f"{args.url}/healthz", timeout=10).raise_for_status()
        # one query first: a server that wants a key refused every request of the run, unexplained
        probe = httpx.post(f"{args.url}/v1/search/text", json={"query": QUERIES[0], "k": 1},
                           headers=auth_headers(args.api_key), timeout=60)
    except httpx.HTTPError as exc:
        raise ValueError(f"no clipsearch server answers at {args.url} ({exc}); start one with `make serve`") from None
    if probe.status_code == 401:
        raise ValueError(f"the server at {args.url} " + ("refused the API key given" if args.api_key else
                         "wants an API key (its CLIPSEARCH_API_KEYS): pass one with --api-key"))
    report = drive_processes(args.url, args.clients, args.duration, args.image_share, args.processes, args.api_key,
                             args.varied_texts)
    result = {"clients": args.clients, "processes": args.processes, "image_share": args.image_share,
              "varied_texts": args.varied_texts,
              **report.as_dict(),
              "batches": batch_sizes(httpx.get(f"{args.url}/metrics", timeout=10).text)}
    print(json.dumps(result, indent=2))
    return 0 if report.passed(args.allow_shed) else 1


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="drive a running server with concurrent clients")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds")
    parser.add_argument("--image-share", type=float, default=0.3, help="share of image queries")
    parser.add_argument("--processes", type=int, default=1,
                        help="load-generator processes sharing the clients (one tops out near 260 requests/s)")
    parser.add_argument("--allow-shed", action="store_true",
                        help="an overload run: 429 refusals are expected and do not fail it")
    parser.add_argument("--api-key", default=None,
                        help="a key the server accepts (one of its CLIPSEARCH_API_KEYS), sent as a bearer token")
    parser.add_argument("--varied-texts", action="store_true",
                        help="text queries of 1 to 60 words instead of the fixed 2-5 word ones (every text width)")
    parser.set_defaults(handler=_handle)
