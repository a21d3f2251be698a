"""`clipsearch demo`: index the demo gallery with the default model, start the server, and show
example queries as the curl commands a user would type, with their answers.

The gallery is the Debian tuxpaint stamps (about 800 photos and drawings). The index is
incremental, so a second demo starts in seconds. With a terminal attached the server keeps
running until Ctrl-C; without one (CI, scripts) the demo exits after the examples.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EXAMPLE_QUERIES: tuple[str, ...] = (
    "a bird",
    "a piece of fruit",
    "a musical instrument",
    "a road sign",
    "a car",
    "a flower",
    "a boat",
    "a dinosaur",
    "a Christmas decoration",
    "a planet",
)
STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")


def _start_server(app: Any, host: str, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    return server, thread


def _curl(base: str, path: str, body: dict[str, Any]) -> str:
    return f"curl -s {base}{path} -H 'content-type: application/json' -d '{json.dumps(body)}'"


def _results(base: str, path: str, body: dict[str, Any], side_may_lack: bool = False) -> list[dict[str, Any]] | None:
    """The `results` of one search; a refusal (say, a k above the server's limit) raises ValueError
    with the server's own message instead of a KeyError on the missing field. With `side_may_lack`,
    an index without the side searched (409: no captions, say) gives None."""
    import httpx

    response = httpx.post(f"{base}{path}", json=body, timeout=30)
    if response.status_code == 409 and side_may_lack:
        return None
    if response.status_code != 200:
        error = response.json().get("error", {}) if "json" in response.headers.get("content-type", "") else {}
        raise ValueError(f"the server refused {path} {json.dumps(body)}: {response.status_code} "
                         f"{error.get('message', response.text[:200])}")
    results: list[dict[str, Any]] = response.json()["results"]
    return results


def show_examples(base: str, queries: Sequence[str], k: int, markdown: bool) -> str:
    """Run the example queries against a live server; return them as text (or a Markdown table)."""
    import httpx

    lines: list[str] = []
    if markdown:
        lines += ["| query | top results (score, stamp file: its description) |", "|---|---|"]
    for query in queries:
        body = {"query": query, "k": k}
        results = _results(base, "/v1/search/text", body) or []
        if markdown:
            cells = "<br>".join(f"{r['score']:.2f} `{Path(r['source']).name}`: {r['caption'] or '-'}"
                                for r in results)
            lines.append(f"| {query} | {cells} |")
            continue
        lines.append(f"\n$ {_curl(base, '/v1/search/text', body)}")
        for rank, r in enumerate(results, 1):
            lines.append(f"  {rank}. {r['score']:.3f}  {r['source']}  ({r['caption'] or 'no caption'})")
    if not markdown:
        body = {"id": 0, "k": 3, "target": "texts"}
        item = httpx.get(f"{base}/v1/items/0", timeout=30).json()
        labels = _results(base, "/v1/search/image", body, side_may_lack=True)
        if labels is None:
            lines.append("\nimage -> text: skipped, the gallery's images came without captions")
            return "\n".join(lines)
        lines.append(f"\nimage -> text: captions nearest to the image of item 0 ({item['source']})")
        lines.append(f"$ {_curl(base, '/v1/search/image', body)}")
        for rank, r in enumerate(labels, 1):
            lines.append(f"  {rank}. {r['score']:.3f}  {r['caption']}")
    return "\n".join(lines)


def run_demo(model: str, gallery: Path, out: Path, host: str, port: int, queries: Sequence[str], k: int,
             markdown: bool, serve: bool) -> int:
    from app.lbtest import wait_http
    from app.listen import ensure_can_listen
    from app.main import create_app
    from app.settings import Settings
    from indexer.reader import open_source
    from indexer.runner import IndexConfig, run_index
    from models.encoder import load_encoder

    if not gallery.is_dir():
        raise FileNotFoundError(f"{gallery} not found: apt-get install tuxpaint-stamps-default (make install does)")
    # before the indexing: a port taken by another server (a `make serve` left running) failed only
    # after it, then waited two minutes on whatever answered there
    ensure_can_listen(host, port)
    encoder = load_encoder(model)
    summary = run_index(open_source(gallery), encoder, IndexConfig(out_dir=out, progress=not markdown))
    if not markdown:
        print(summary.render())
    settings = Settings(index_dir=out, model=model, host=host, port=port)
    server, thread = _start_server(create_app(settings, encoder=encoder), host, port)
    base = f"http://{host}:{port}"
    try:
        wait_http(f"{base}/readyz", 120, thread=thread)  # a server that could not start ends its thread
        print(show_examples(base, queries, k, markdown))
        if serve:
            print(f"\nSearch page: {base}/   API docs: {base}/docs   (Ctrl-C to stop)")
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(10)
    return 0


def _handle(args: argparse.Namespace) -> int:
    if args.k < 1:  # before the gallery is indexed, not after
        raise ValueError(f"-k must be at least 1, got {args.k}")
    serve = args.serve if args.serve is not None else sys.stdin.isatty()
    return run_demo(args.model, args.gallery, args.out, args.host, args.port, args.query or list(EXAMPLE_QUERIES),
                    args.k, args.markdown, serve and not args.markdown)


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="index the stamps gallery, serve it, show example queries")
    parser.add_argument("--model", default="default", help="model to use (default: the embedded one)")
    parser.add_argument("--gallery", type=Path, default=STAMPS_ROOT, help="folder of images")
    parser.add_argument("--out", type=Path, default=Path("indexes/default"),
                        help="index directory (the one `make index` writes by default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--query", action="append", help="a text query (repeatable; default: examples)")
    parser.add_argument("-k", type=int, default=3, help="results per query")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=None,
                        help="keep serving after the examples (default: when run from a terminal)")
    parser.set_defaults(handler=_handle)
