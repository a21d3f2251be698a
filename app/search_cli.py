"""`clipsearch search`: query a published index from the terminal, with no server running.

For a quick look at an index, or a script that wants the top matches of a few queries: the same
search as the server's (`SearchService.search_vectors`: filters, exact search among rare filtered
subsets, the index's tuned parameters), one query at a time, without batching or HTTP. Results are
printed ranked, or as the API's JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from models.precision import INFERENCE_HELP, PRECISIONS

logger = logging.getLogger(__name__)


def parse_condition(text: str, option: str) -> tuple[str, Any]:
    """`FIELD=VALUE` -> (field, value); the value read as JSON when it is (numbers, true/false),
    else kept as text, so `width=48` compares as a number and `album=summer` as a string."""
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise ValueError(f"{option} takes FIELD=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return field, value
    return field, parsed if isinstance(parsed, int | float | bool) else value


def _search(args: argparse.Namespace) -> int:
    from app.errors import ServiceError
    from app.filters import Filter
    from app.observability import Metrics
    from app.search import SearchService, as_result
    from app.settings import Settings
    from indexer.artifacts import load_index
    from models import ImageRejected, load_image
    from models.encoder import load_encoder

    if (args.query is None) == (args.image is None):
        raise ValueError("give a query text or --image PATH (one of them)")
    if args.query is not None and not args.query.strip():
        raise ValueError("the query text is blank")
    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    filters = [Filter(field, eq=value) for field, value in (parse_condition(t, "--where") for t in args.where)]
    filters += [Filter(field, prefix=str(value)) for field, value in
                (parse_condition(t, "--prefix") for t in args.prefix)]
    if filters and args.target == "texts":
        raise ValueError("--where and --prefix apply to image searches only")
    image = None
    if args.image is not None:  # a bad file is said before the model loads
        try:
            image = load_image(args.image)
        except ImageRejected as exc:
            raise ValueError(f"{args.image}: {exc.message}") from None
    encoder = load_encoder(args.model, args.pretrained, device=args.device, precision=args.precision)
    index = load_index(args.index, expected=encoder.fingerprint)
    service = SearchService(encoder, index, Settings(index_dir=args.index), Metrics())
    try:
        vector = encoder.encode_images([image])[0] if image is not None else encoder.encode_texts([args.query])[0]
        found, hits = service.search_vectors(vector, args.target, args.k, 0, args.min_score, filters)
    except ServiceError as exc:  # the server's 4xx, here as a one-line error
        raise ValueError(exc.message) from None
    finally:
        service.device_thread.shutdown(wait=False)
    results = [as_result(found, hit, args.target).model_dump(exclude_none=True) for hit in hits]
    if args.json:
        print(json.dumps({"results": results, "index_version": found.version}, ensure_ascii=False, indent=2))
        return 0
    if not results:
        print("no results" + (" (none match the filters)" if filters else "") +
              (f" scoring at least {args.min_score}" if args.min_score is not None else ""))
    for rank, result in enumerate(results, 1):
        if args.target == "texts":  # a caption or label, and the items it came with (none for labels)
            items = ", ".join(map(str, result.get("item_ids", [])))
            print(f"{rank:>3}. {result['score']:.3f}  {result['caption']}" + (f"  (items {items})" if items else ""))
        else:
            print(f"{rank:>3}. {result['score']:.3f}  {result['source']}  ({result.get('caption') or 'no caption'})")
    return 0


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("search", help="query an index from the terminal (no server)")
    parser.add_argument("query", nargs="?", help="a text (or --image)")
    parser.add_argument("--image", type=Path, help="an image file as the query")
    parser.add_argument("--index", type=Path, default=Path("indexes/default"), help="index directory (%(default)s)")
    parser.add_argument("--model", default="default", help="the index's model, as for `clipsearch index`")
    parser.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint for an architecture")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA when present)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=INFERENCE_HELP)
    parser.add_argument("-k", type=int, default=10, help="results (%(default)s)")
    parser.add_argument("--target", choices=("images", "texts"), default="images",
                        help="images (default), or texts: the captions/labels nearest to the query")
    parser.add_argument("--min-score", type=float, default=None, help="drop results scoring below this")
    parser.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE",
                        help="keep items whose FIELD equals VALUE (repeatable; all must hold)")
    parser.add_argument("--prefix", action="append", default=[], metavar="FIELD=PREFIX",
                        help="keep items whose FIELD starts with PREFIX (e.g. source=animals/)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of a ranked list")
    parser.set_defaults(handler=_search)
