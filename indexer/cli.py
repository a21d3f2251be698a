"""The `clipsearch index` subcommand: parse options at the edge, run one indexing job."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from models.precision import INFERENCE_HELP, PRECISIONS

logger = logging.getLogger(__name__)


def _index(args: argparse.Namespace) -> int:
    from indexer.artifacts import ensure_not_busy
    from indexer.ray_backend import RayOptions
    from indexer.reader import open_source
    from indexer.runner import IndexConfig, run_index
    from models.encoder import load_encoder
    from models.images import ImageLimits

    source = open_source(args.data, args.image_column, args.caption_column)
    # the settings first: one no run can use fails before the model loads
    if not args.memory_budget_gb > 0:  # said here in the unit the user gave, not in bytes
        raise ValueError(f"--memory-budget-gb must be positive, got {args.memory_budget_gb}")
    config = IndexConfig(
        out_dir=args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        shard_size=args.shard_size,
        index_type=args.index_type,
        float16=args.float16,
        memory_budget_bytes=int(args.memory_budget_gb * (1 << 30)),
        use_gpu=not args.no_gpu,
        limits=ImageLimits(max_pixels=args.max_pixels, max_bytes=args.max_bytes),
        progress=not args.quiet,
        backend=args.backend,
        ray=RayOptions(model=args.model, pretrained=args.pretrained, address=args.ray_address,
                       actors=args.ray_actors, batch_size=args.batch_size, device=args.device,
                       precision=args.precision)
        if args.backend == "ray" else None,
    )
    ensure_not_busy(args.out)
    encoder = load_encoder(args.model, args.pretrained, device=args.device, image_batch_size=args.batch_size,
                           precision=args.precision)
    logger.info("model %s on %s; %d inputs from %s", encoder.fingerprint, encoder.runs_as,
                len(source.records), source.root)
    summary = run_index(source, encoder, config)
    print(summary.render())
    return 0 if summary.balanced and not summary.all_rejected else 1


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("index", help="build a FAISS index of a folder or manifest of images")
    parser.add_argument("data", type=Path, help="a folder of images (recursive, optional same-name .txt "
                        "captions), a CSV/TSV/JSONL/Parquet manifest, or a .txt file of labels")
    parser.add_argument("--out", type=Path, default=Path("indexes/default"), help="index directory (%(default)s)")
    parser.add_argument("--model", default="default", help="as for `clipsearch eval` (default: embedded model)")
    parser.add_argument("--pretrained", default=None, help="pretrained tag or checkpoint for an architecture")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA when present)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help=INFERENCE_HELP)
    parser.add_argument("--image-column", default=None, help="manifest column with image paths")
    parser.add_argument("--caption-column", default=None, help="manifest column with captions")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call")
    parser.add_argument("--workers", type=int, default=4, help="decode threads")
    parser.add_argument("--shard-size", type=int, default=2048, help="records per resumable shard")
    parser.add_argument("--index-type", default=None, help="FAISS factory string (default: by size)")
    parser.add_argument("--float16", action="store_true", help="store embeddings.npy as float16")
    parser.add_argument("--memory-budget-gb", type=float, default=8.0, help="for the index choice")
    parser.add_argument("--no-gpu", action="store_true", help="build the FAISS index on the CPU")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="larger images are rejected")
    parser.add_argument("--max-bytes", type=int, default=32 << 20, help="larger files are rejected")
    parser.add_argument("--backend", choices=("local", "ray"), default="local",
                        help="ray: decode and embed on a Ray cluster (GPU actors when it has GPUs)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: local instance)")
    parser.add_argument("--ray-actors", type=int, default=2, help="embedding actors (one model each)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=_index)
