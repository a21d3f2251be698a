"""`python -m app.bench_filters`: what new metadata filters cost the other requests of a server
whose index holds a million items (`make bench-filters`).

In one process (the app through httpx's ASGI transport, as the tests run it), a published index's
metadata is stretched to `--items` entries by repeating its items (the FAISS index stays the
published one: the cost measured is the filters', not the search's). `--clients` clients send
plain text searches while one more sends text searches each with a filter never seen before
(`caption == "no such caption N"`, or `caption contains ...` with `--kind contains`), so every one
of them judges all the items (`--kind none`: no such client, the baseline). Printed: the plain searches' count and latency, and the filtered
searches' count.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.main import create_app
from app.settings import Settings
from models import load_encoder


async def measure(index_dir: Path, encoder: Any, items: int, clients: int, seconds: float, kind: str) -> dict:
    app = create_app(Settings(index_dir=index_dir, reload_interval_s=0), encoder=encoder)
    async with app.router.lifespan_context(app):
        service = app.state.service
        published = service.index.metadata
        stretched = [dict(published[i % len(published)], id=i) for i in range(items)]
        service.index = dataclasses.replace(service.index, metadata=stretched)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=120) as client:
            deadline = time.perf_counter() + seconds
            plain: list[float] = []

            async def search(body: dict) -> None:
                response = await client.post("/v1/search/text", json=body)
                response.raise_for_status()

            async def plain_client() -> None:
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    await search({"query": "a bird", "k": 10})
                    plain.append(time.perf_counter() - started)

            async def filter_client() -> int:
                sent = 0
                while kind != "none" and time.perf_counter() < deadline:
                    sent += 1
                    condition = {"field": "caption", kind: f"no such caption {sent}"}
                    await search({"query": "a bird", "k": 10, "filters": [condition]})
                return sent

            *_, filtered = await asyncio.gather(*(plain_client() for _ in range(clients)), filter_client())
    ms = np.array(plain) * 1000
    return {"items": items, "kind": kind, "plain_searches": len(plain), "plain_p50_ms": round(float(np.median(ms))),
            "plain_p99_ms": round(float(np.percentile(ms, 99))), "plain_max_ms": round(float(ms.max())),
            "filtered_searches": filtered}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.bench_filters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, default=Path("build/bench-index"), help="a published index")
    parser.add_argument("--model", default="models/default", help="the index's model")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=8, help="clients sending plain searches")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds")
    parser.add_argument("--kind", choices=("eq", "contains", "none"), default="eq",
                        help="the filters' condition; none: no filtering client (the baseline)")
    args = parser.parse_args(argv)
    encoder = load_encoder(args.model, device="cpu")
    print(asyncio.run(measure(args.index, encoder, args.items, args.clients, args.duration, args.kind)))


if __name__ == "__main__":
    main()
