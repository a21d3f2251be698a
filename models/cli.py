"""The model subcommands of `clipsearch`: `train`, `eval` and `model` (rebuild the default model).

Arguments are parsed here, at the edge, into `TrainConfig` and plain values; the library functions
never see the argparse namespace. Heavy imports happen inside the handlers so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

# a light module: the CLI imports torch only when a command runs
from models.config import AugmentConfig, CaptionBankConfig, TrainConfig
from models.precision import INFERENCE_HELP, PRECISIONS

logger = logging.getLogger(__name__)


def _add_model_arguments(parser: argparse.ArgumentParser, default: str = "default") -> None:
    parser.add_argument(
        "--model",
        default=default,
        help="'default' (the embedded model), a model directory, an open_clip architecture name "
        "(e.g. ViT-B-32), or open_clip's local-dir:/hf-hub: names (default: %(default)s)",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help="with an architecture name: an open_clip pretrained tag (e.g. laion2b_s34b_b79k, needs "
        "the hub) or a local checkpoint file",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")


def _add_data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument(
        "data",
        type=Path,
        help="a CSV/TSV/JSONL/Parquet manifest, a folder of images with same-name .txt captions, or a "
        "Karpathy-split JSON (with --images-root)",
    )
    parser.add_argument("--image-column", default=None, help="manifest column with image paths")
    parser.add_argument("--caption-column", default=None, help="manifest column with captions")
    parser.add_argument("--images-root", type=Path, default=None, help="image folder of a Karpathy JSON")
    parser.add_argument(
        "--split", default=split,
        help="Karpathy splits to use, comma-separated (train, restval, val, test; 'all': every one; "
        "default: %(default)s)",
    )


def _read_pairs(args: argparse.Namespace) -> Any:
    from models.data import read_pairs

    pair_set = read_pairs(
        args.data,
        image_column=args.image_column,
        caption_column=args.caption_column,
        images_root=args.images_root,
        karpathy_split=None if args.split == "all" else [name.strip() for name in args.split.split(",")],
    )
    if pair_set.skipped:
        logger.warning("skipped %d rows: %s", sum(pair_set.skipped.values()), dict(pair_set.skipped))
    if not pair_set.pairs:  # now, not after the model load
        hint = ("; in a folder, each image needs a same-name .txt caption"
                if pair_set.skipped.get("missing_caption") else "")
        raise ValueError(f"{args.data}: no usable image-caption pairs (skipped: {dict(pair_set.skipped)}){hint}")
    return pair_set


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The `TrainConfig` of `clipsearch train`; options that would change nothing are refused here,
    before minutes of decoding and training."""
    distill = {k: v for k, v in (("distill_weight", args.distill_weight),
                                 ("distill_temperature", args.distill_temperature)) if v is not None}
    if distill and args.teacher is None:  # it would be recorded in the recipe, yet change nothing
        raise ValueError("--distill-weight and --distill-temperature need --teacher MODEL_DIR")
    semantic = {} if args.semantic_temperature is None else {"semantic_temperature": args.semantic_temperature}
    if semantic and not args.semantic_smoothing:  # the same: recorded, yet changing nothing
        raise ValueError("--semantic-temperature needs --semantic-smoothing W")
    bank_weight = {} if args.caption_bank_weight is None else {"caption_bank_weight": args.caption_bank_weight}
    if bank_weight and not args.lock_text:  # the caption-bank loss needs a frozen text tower's captions
        raise ValueError("--caption-bank-weight needs --lock-text: only a locked text tower has the caption-bank loss")
    if args.image_bank and not args.caption_bank:  # refused before minutes of training, not after
        raise ValueError("--image-bank needs --caption-bank: the caption bank's rows are its keys")
    return TrainConfig(
        output_dir=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        mixup_alpha=args.mixup,
        random_erasing=args.random_erasing,
        semantic_smoothing=args.semantic_smoothing,
        **semantic,
        **bank_weight,
        teacher=args.teacher,
        **distill,
        lock_text=args.lock_text,
        lock_image=args.lock_image,
        val_fraction=args.val_fraction,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        split_seed=args.split_seed,
        num_workers=args.workers,
        cache_images=not args.no_cache,
        caption_bank=CaptionBankConfig() if args.caption_bank else None,
        augment=AugmentConfig(trivial_augment=args.trivial_augment) if not args.no_augment else AugmentConfig(
            scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0, grayscale=0.0
        ),
        device=args.device,
        precision=args.precision,
        max_steps=args.max_steps,
        progress=not args.quiet,
    )


def _train(args: argparse.Namespace) -> int:
    import open_clip
    import torch

    from models.encoder import create_model
    from models.train import Trainer

    config = _train_config(args)
    pair_set = _read_pairs(args)
    torch.manual_seed(args.seed)  # the initial weights of a model trained from scratch
    loaded = create_model(args.model, args.pretrained)
    tokenizer = open_clip.get_tokenizer(loaded.registered_name)
    trainer = Trainer(loaded, tokenizer, pair_set, config)
    result = trainer.run()
    if args.image_bank:
        from models.config import ImageBankConfig
        from models.encoder import load_encoder
        from models.image_bank import build_image_bank

        encoder = load_encoder(result.model_dir, device=args.device, image_bank=False)
        bank, _ = build_image_bank(encoder, trainer.train_examples.as_pairs(), ImageBankConfig(), not args.quiet)
        bank.attach(result.model_dir)
    last = result.metrics[-1] if result.metrics else {}
    print(json.dumps({"model_dir": str(result.model_dir), "steps": result.steps,
                      "skipped": dict(result.skipped), "last_epoch": last}, indent=2))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from models.encoder import load_encoder
    from models.evaluate import evaluate, held_out_only
    from models.leakage import copies_across_split, warn_copies

    if args.json:  # its folder made now: a path that cannot be written fails before the minutes of scoring
        args.json.parent.mkdir(parents=True, exist_ok=True)
    pair_set = _read_pairs(args)
    extra: dict[str, object] = {}
    if args.held_out is not None:
        everything = pair_set
        pair_set = held_out_only(everything, args.held_out, args.seed)
        held = {p.image for p in pair_set.pairs}
        copies = copies_across_split([p.image for p in everything.pairs if p.image not in held], held)
        warn_copies(copies, len(held))
        extra["held_out_copies"] = len(copies)
    encoder = load_encoder(args.model, args.pretrained, device=args.device, caption_bank=not args.no_caption_bank,
                           image_bank=not args.no_image_bank, precision=args.precision)
    report = evaluate(encoder, pair_set, progress=not args.quiet)
    result = {"model": str(encoder.fingerprint), **report.as_dict(), **extra}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


def _model(args: argparse.Namespace) -> int:
    from models.default_model import RECIPE_WRITER, checked_changes, export_default_model, train_default_model
    from models.folder_lock import folder_lock

    if args.pack or args.image_bank or args.data_only:
        return _model_without_training(args)
    started = time.time()
    from models.default_model import DEFAULT_EPOCHS, RESTART_EPOCHS

    changes = checked_changes(dict(_key_value(text) for text in args.change))  # before minutes of work
    if changes and args.inner_split is None and not args.no_export:
        raise SystemExit("clipsearch model: a changed recipe is an experiment; add --inner-split S or --no-export "
                         "(models/default/ holds the committed recipe's model)")

    # `or` would read --epochs 0 as "the recipe's 240" and start 50 minutes of training
    epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
    restart_epochs = RESTART_EPOCHS if args.restart_epochs is None else args.restart_epochs
    if epochs < 1 or restart_epochs < 0:
        raise ValueError(f"--epochs must be at least 1 and --restart-epochs at least 0 (0: no second cycle), "
                         f"got {epochs} and {restart_epochs}")
    inner = args.inner_split
    run_dir = args.run_dir or (Path("runs/default") if inner is None else Path(f"runs/inner-{inner}"))
    exporting = inner is None and not args.no_export
    # held from the data set to the export: a second `make model` (another terminal) is refused at
    # once instead of resuming this run's checkpoints beside it
    with folder_lock(run_dir, RECIPE_WRITER, reentrant=True):
        trained = train_default_model(args.data_dir, run_dir, epochs=epochs, restart_epochs=restart_epochs,
                                      progress=not args.quiet, precision=args.precision, device=args.device,
                                      inner_split=inner, workers=args.workers, changes=changes,
                                      image_bank=not exporting)  # the export builds the one it ships
        logger.info("trained in %.1f min", (time.time() - started) / 60)
        if inner is not None:  # an experiment: scored on its own held-out images, never exported
            _report_inner_split(args, trained, run_dir, changes)
            return 0
        if args.no_export:
            print(trained)
            return 0
        # The export stores the tower in float16: its image bank is built from those weights, the ones
        # served, rather than from the float32 average (the committed bank was built so)
        exported = export_default_model(trained, data_dir=args.data_dir, device=args.device,
                                        progress=not args.quiet)
    print(exported)
    return 0


def _model_without_training(args: argparse.Namespace) -> int:
    """`clipsearch model --pack`, `--image-bank` and `--data-only`: seconds, no training."""
    from models.default_model import attach_image_bank, pack_default_data, recipe_manifest

    if args.pack:
        record = pack_default_data(args.data_dir, args.pack, progress=not args.quiet)
        print(json.dumps({"pack": str(args.pack), **{k: v for k, v in record.items() if k != "rejected"},
                          "rejected": len(record["rejected"])}, indent=2))
    elif args.image_bank:
        skipped = attach_image_bank(args.image_bank, args.data_dir, args.inner_split, args.device,
                                    progress=not args.quiet)
        print(json.dumps({"model_dir": str(args.image_bank), "image_bank": "attached",
                          "skipped": dict(skipped)}, indent=2))
    else:  # --data-only: enough to score the committed model on its held-out set
        recipe_manifest(args.data_dir)
        print(args.data_dir / "eval.jsonl")
    return 0


def _report_inner_split(args: argparse.Namespace, trained: Path, run_dir: Path, changes: dict[str, Any]) -> None:
    """Score an inner-split run on the images its split held out, with and without the caption bank;
    print it and save it to RUN_DIR/inner-split.json."""
    from models import checkpoint
    from models.default_model import inner_split_report

    def score(caption_bank: bool) -> dict[str, Any]:
        return inner_split_report(trained, args.data_dir / "eval.jsonl", args.inner_split, args.device,
                                  caption_bank=caption_bank, progress=not args.quiet).as_dict()

    result = {"inner_split": args.inner_split, "model_dir": str(trained),
              "changes": json.loads(json.dumps(changes, default=str)),
              "with_caption_bank": score(True), "image_tower_alone": score(False)}
    checkpoint.write_json(run_dir / "inner-split.json", result)
    print(json.dumps(result, indent=2))


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise SystemExit(f"clipsearch model: --change takes KEY=VALUE, not {text!r}")
    return key.strip(), value.strip()


def add_commands(subparsers: Any) -> None:
    """Register `train`, `eval` and `model` on the root parser's subparsers."""
    _add_train_command(subparsers)
    _add_eval_command(subparsers)
    _add_model_command(subparsers)


def _add_train_command(subparsers: Any) -> None:
    train = subparsers.add_parser("train", help="contrastive training on image-caption pairs")
    # training never reads the test split unless asked: "train,restval" is Karpathy's COCO training
    # set (Flickr30k has no restval); the default was "test", evaluation's, for both commands
    _add_data_arguments(train, split="train,restval")
    _add_model_arguments(train, default="clipsearch-tiny")
    train.add_argument("--out", type=Path, required=True, help="run directory (resumed when it exists)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=5e-4)
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--warmup-steps", type=int, default=100)
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA",
                       help="blend image pairs by lambda ~ Beta(ALPHA, ALPHA), and their targets alike (0: off)")
    train.add_argument("--random-erasing", type=float, default=0.0, metavar="P",
                       help="with probability P fill one random rectangle of each training image with noise (0: off)")
    train.add_argument("--caption-bank-weight", type=float, default=None, metavar="W",
                       help="with --lock-text: the caption-bank loss's share of the loss, the in-batch InfoNCE's "
                       "1 - W (default 0.5)")
    train.add_argument("--semantic-smoothing", type=float, default=0.0, metavar="W",
                       help="with --lock-text: move this share of each image's caption-bank target onto its captions' "
                       "text neighbours (0: off)")
    train.add_argument("--semantic-temperature", type=float, default=None,
                       help="the softmax temperature of those neighbours' text similarities (default 0.05)")
    train.add_argument("--teacher", type=Path, default=None, metavar="MODEL_DIR",
                       help="with --lock-text: distil this trained model (same text tower) into the run: its "
                       "distribution over the training captions for each batch becomes a second target")
    train.add_argument("--distill-weight", type=float, default=None,
                       help="with --teacher: the loss is (1 - W) * the contrastive loss + W * the teacher's (default 0.5)")
    train.add_argument("--distill-temperature", type=float, default=None,
                       help="with --teacher: the softmax temperature of both distributions (default 0.05)")
    train.add_argument("--lock-text", action="store_true", help="freeze the text tower (LiT)")
    train.add_argument("--lock-image", action="store_true", help="freeze the image tower")
    train.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of images")
    train.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    train.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    train.add_argument("--seed", type=int, default=0,
                       help="draws the initial weights, the order, the augmentation and the held-out split")
    train.add_argument("--split-seed", type=int, default=None,
                       help="draws the held-out split alone (default: --seed): runs of several seeds on one split")
    train.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: mixed precision on CUDA, float32 on the CPU; bf16: bf16 autocast on the "
                            "CPU too (faster on some CPUs with native bf16, slower on others: time a short run first)")
    train.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    train.add_argument("--no-cache", action="store_true", help="re-read images every epoch")
    augment = train.add_mutually_exclusive_group()
    augment.add_argument("--no-augment", action="store_true", help="plain resize, no augmentation")
    augment.add_argument("--trivial-augment", action="store_true",
                         help="add TrivialAugment (strong; worth it with long schedules)")
    train.add_argument("--caption-bank", action="store_true",
                       help="with --lock-text: ship the training captions with the model and mix each image "
                       "embedding with its nearest ones (helps unseen concepts on small data)")
    train.add_argument("--image-bank", action="store_true",
                       help="with --caption-bank: after training, ship the training images' embeddings too and mix "
                       "each caption embedded for image -> text search with them (models/image_bank.py)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train)


def _add_eval_command(subparsers: Any) -> None:
    evaluate = subparsers.add_parser("eval", help="Recall@1/5/10 of a model on a captioned set")
    _add_data_arguments(evaluate, split="test")
    _add_model_arguments(evaluate)
    evaluate.add_argument(
        "--held-out", type=float, default=None, metavar="FRACTION",
        help="score only the pairs a training run with this --val-fraction held out",
    )
    evaluate.add_argument("--seed", type=int, default=0,
                          help="with --held-out: the seed that drew the training run's split (its --split-seed, else its --seed)")
    evaluate.add_argument("--json", type=Path, default=None, help="also write the report here")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="auto", help=INFERENCE_HELP)
    evaluate.add_argument("--no-caption-bank", action="store_true",
                          help="score the image tower alone, without the model directory's caption bank (nor "
                          "its image bank, built through it)")
    evaluate.add_argument("--no-image-bank", action="store_true",
                          help="image -> text against the captions as plain texts, without the model directory's "
                          "image bank")
    evaluate.add_argument("--quiet", action="store_true")
    evaluate.set_defaults(handler=_eval)


def _add_model_command(subparsers: Any) -> None:
    model = subparsers.add_parser("model", help="rebuild the embedded default model from Debian packages")
    model.add_argument("--data-dir", type=Path, default=Path("build/default-data"),
                       help="where the data set is built from the Debian packages, or a data pack (--pack) to "
                       "train from as it is (default: %(default)s)")
    model.add_argument("--pack", type=Path, default=None, metavar="DIR",
                       help="build the data set, then write it into DIR as a data pack: every image as the trainer "
                       "keeps it (128 px PNG, about 14 MB in all) with the manifests, to train with --data-dir DIR "
                       "on a machine without the Debian packages; exactly as on the originals")
    model.add_argument("--workers", type=int, default=0,
                       help="data-loader processes (default 0: none helps on 2 cores; a GPU needs several). "
                       "Another run than with none: the augmentation draws come from the workers")
    model.add_argument("--run-dir", type=Path, default=None, help="default: runs/default, or runs/inner-S")
    model.add_argument("--epochs", type=int, default=None, help="first cycle; default: the recipe's own")
    model.add_argument("--restart-epochs", type=int, default=None,
                       help="a second cycle of this many epochs from the first one's weights; the model is then "
                       "the average of both (default: the recipe's; 0: one cycle only)")
    model.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="auto: float32 on the CPU, as the committed model was trained; bf16: bf16 autocast "
                       "(level in quality; faster on some CPUs with native bf16, slower on others: README, Training)")
    model.add_argument("--device", default="cpu",
                       help="cpu (default: where the committed model was trained), cuda, cuda:1 ... On CUDA `auto` "
                       "precision is bf16 autocast: another run of the same recipe, not a reproduction of the "
                       "committed weights")
    model.add_argument("--inner-split", type=int, default=None, metavar="S",
                       help="an experiment: train on the recipe's training side only, hold out 20 %% of it by "
                       "seed S, print and save (RUN_DIR/inner-split.json) its Recall@K there; never exported, "
                       "never scored on the held-out set (README: the experiment table's inner splits 1 and 2)")
    model.add_argument("--change", action="append", default=[], metavar="KEY=VALUE",
                       help="an experiment: change one setting of the recipe in both cycles (lr_scale, "
                       "a factor on each cycle's peak learning rate; weight_decay, label_smoothing, mixup_alpha, "
                       "random_erasing, crop_scale_min (the random crops' smallest share of the area), grad_clip, warmup_steps, "
                       "batch_size, semantic_smoothing, semantic_temperature, caption_bank_weight (the caption-bank loss's "
                       "share, 0.5); "
                       "teacher=MODEL_DIR to distil a trained model into the run, with distill_weight and "
                       "distill_temperature; seed=N, another seed for the initial weights and the run's randomness "
                       "on the same split); repeatable; with --inner-split or --no-export only")
    model.add_argument("--no-export", action="store_true", help="train only; leave models/default/ alone")
    model.add_argument("--data-only", action="store_true",
                       help="only build the data set (seconds), e.g. to run `clipsearch eval` on its held-out split")
    model.add_argument("--image-bank", type=Path, default=None, metavar="MODEL_DIR",
                       help="no training: (re)build the image bank of MODEL_DIR, a model the recipe trained on "
                       "--data-dir (with --inner-split S if it was an inner-split run), from its own weights "
                       "(seconds); training builds it anyway")
    model.add_argument("--quiet", action="store_true")
    model.set_defaults(handler=_model)


def main(argv: list[str] | None = None) -> int:
    """Entry point with only the model subcommands (the full CLI is `app.cli:main`)."""
    parser = argparse.ArgumentParser(prog="clipsearch")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.handler(args))
