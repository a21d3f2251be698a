"""`clipsearch demo`: embed the demo gallery with the default model and answer example queries.

The gallery is the Debian tuxpaint stamps (about 800 photos and drawings). Every image is embedded
once; text queries are answered by exact inner-product search over the unit-norm embeddings, and
a few gallery images are labelled zero-shot against the stamp category phrases (image -> text).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

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


@dataclass(frozen=True)
class GalleryItem:
    source: str  # path relative to the gallery root
    caption: str


@dataclass
class Gallery:
    items: list[GalleryItem]
    embeddings: np.ndarray  # (N, D) float32, unit norm
    rejected: dict[str, str]

    def search(self, query_embeddings: np.ndarray, k: int) -> list[list[tuple[GalleryItem, float]]]:
        """Exact top-k by cosine similarity for each query row `(Q, D)`."""
        scores = query_embeddings @ self.embeddings.T  # (Q, N)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(self.items[j], float(scores[q, j])) for j in row] for q, row in enumerate(top)]


def build_gallery(encoder: Any, root: Path, progress: bool = True) -> Gallery:
    """Decode and embed every image under `root`; unreadable ones are reported, not fatal."""
    from tqdm import tqdm

    from models.default_data import stamp_caption
    from models.images import IMAGE_SUFFIXES, ImageRejected, load_image

    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    items: list[GalleryItem] = []
    images = []
    rejected: dict[str, str] = {}
    for path in tqdm(paths, desc="decode", disable=not progress):
        relative = str(path.relative_to(root))
        try:
            images.append(load_image(path))
        except ImageRejected as exc:
            rejected[relative] = f"{exc.reason}: {exc.message}"
            continue
        items.append(GalleryItem(relative, stamp_caption(path)))  # same-name .txt, first line
    embeddings = encoder.encode_images(images)
    return Gallery(items, embeddings, rejected)


def format_results(queries: Sequence[str], results: list[list[tuple[GalleryItem, float]]],
                   markdown: bool) -> str:
    lines: list[str] = []
    if markdown:
        lines += ["| query | top results (stamp file: its description) |", "|---|---|"]
        for query, hits in zip(queries, results, strict=True):
            cells = "<br>".join(
                f"{score:.2f} `{Path(item.source).name}`: {item.caption or '-'}" for item, score in hits
            )
            lines.append(f"| {query} | {cells} |")
        return "\n".join(lines)
    for query, hits in zip(queries, results, strict=True):
        lines.append(f"\n{query!r}")
        for rank, (item, score) in enumerate(hits, 1):
            lines.append(f"  {rank}. {score:.3f}  {item.source}  ({item.caption or 'no caption'})")
    return "\n".join(lines)


def run_demo(model: str, root: Path, queries: Sequence[str], k: int, markdown: bool) -> str:
    from models.default_data import CATEGORY_PHRASES
    from models.encoder import load_encoder

    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: apt-get install tuxpaint-stamps-default (make install does)")
    encoder = load_encoder(model)
    logger.info("model %s", encoder.fingerprint)
    gallery = build_gallery(encoder, root, progress=not markdown)
    for source, reason in gallery.rejected.items():
        logger.warning("skipped %s: %s", source, reason)
    logger.info("gallery: %d images embedded, %d rejected", len(gallery.items), len(gallery.rejected))
    output = format_results(queries, gallery.search(encoder.encode_texts(list(queries)), k), markdown)
    if not markdown:
        # image -> text: label a few gallery images zero-shot with the category phrases
        labels = sorted(set(CATEGORY_PHRASES.values()))
        label_embeddings = encoder.encode_texts(labels)
        picks = np.linspace(0, len(gallery.items) - 1, 5).astype(int)
        output += "\n\nimage -> text (zero-shot labels for a few gallery images):"
        for index in picks:
            scores = label_embeddings @ gallery.embeddings[index]
            best = np.argsort(-scores)[:3]
            guesses = ", ".join(f"{labels[j]} ({scores[j]:.2f})" for j in best)
            output += f"\n  {gallery.items[index].source}: {guesses}"
    return output


def _handle(args: argparse.Namespace) -> int:
    queries = args.query or list(EXAMPLE_QUERIES)
    print(run_demo(args.model, args.gallery, queries, args.k, args.markdown))
    return 0


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo", help="search the stamps gallery with the default model")
    parser.add_argument("--model", default="default", help="model to use (see `clipsearch eval --help`)")
    parser.add_argument("--gallery", type=Path, default=STAMPS_ROOT, help="folder of images")
    parser.add_argument("--query", action="append", help="a text query (repeatable; default: examples)")
    parser.add_argument("-k", type=int, default=5, help="results per query")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    parser.set_defaults(handler=_handle)
