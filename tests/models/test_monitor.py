"""The trainer's held-out monitor with one caption per image: the figures `clipsearch eval` gives
on a manifest of each held-out image's first caption, every epoch (a caption shared by many images
makes the figures over every caption rank runs otherwise)."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from models import load_encoder
from models.config import AugmentConfig, CaptionBankConfig, TrainConfig
from models.data import read_pairs
from models.encoder import create_model
from models.evaluate import evaluate, held_out_only
from models.train import Trainer, held_out_seed

from ..conftest import TINY

VAL_FRACTION = 0.25


def _write_manifest(shapes_folder: Path, path: Path, with_phrases: bool) -> Path:
    """Each shape image with its own description first ("a red circle number 7") and, `with_phrases`,
    a phrase that half of the images share ("a circle"), as the stamps' category phrases. The
    descriptions are distinct, so no two queries tie: with identical captions which of them ranks
    first is decided by rounding, which two correct computations need not share."""
    rows = []
    for image in sorted(shapes_folder.rglob("*.png")):
        shape = image.with_suffix(".txt").read_text().splitlines()[0]
        rows.append({"image": str(image), "caption": f"{shape} number {int(image.stem)}"})
        if with_phrases:
            rows.append({"image": str(image), "caption": "a " + shape.split()[-1]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _trainer(manifest: Path, out: Path) -> Trainer:
    torch.manual_seed(0)
    loaded = create_model(TINY)
    config = TrainConfig(
        output_dir=out, epochs=2, batch_size=32, lr=2e-3, warmup_steps=5, val_fraction=VAL_FRACTION,
        lock_text=True, caption_bank=CaptionBankConfig(top_k=3, temperature=0.1, blend=0.5),
        augment=AugmentConfig(color_jitter=0.0, grayscale=0.0), device="cpu", progress=False,
    )
    return Trainer(loaded, open_clip.get_tokenizer(loaded.registered_name), read_pairs(manifest), config)


@pytest.fixture(scope="module")
def phrased_run(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    folder = tmp_path_factory.mktemp("phrased")
    trainer = _trainer(_write_manifest(shapes_folder, folder / "pairs.jsonl", with_phrases=True), folder / "run")
    return trainer, trainer.run().model_dir


def test_first_caption_figures_are_what_eval_reports_on_the_first_captions(
    phrased_run: tuple[Trainer, Path], shapes_folder: Path, tmp_path: Path
) -> None:
    trainer, model_dir = phrased_run
    last = trainer.metrics[-1]
    first_captions = _write_manifest(shapes_folder, tmp_path / "first.jsonl", with_phrases=False)
    held_out = held_out_only(read_pairs(first_captions), VAL_FRACTION, held_out_seed(trainer.config))
    assert len(held_out.pairs) == len(trainer.held_examples.images) < len(trainer.held_examples.pairs)
    for prefix, banked in (("first_caption_", False), ("caption_bank_first_caption_", True)):
        report = evaluate(load_encoder(model_dir, device="cpu", caption_bank=banked), held_out, progress=False)
        assert report.texts == report.images == len(held_out.pairs)
        for name, value in report.recall.items():
            # one query of slack: the encoder batches the images otherwise than the monitor does
            assert last[prefix + name] == pytest.approx(value, abs=1.0 / report.texts + 1e-9), (prefix, name)


def test_every_caption_figures_are_kept_beside_them(phrased_run: tuple[Trainer, Path]) -> None:
    trainer, _ = phrased_run
    for record in trainer.metrics:
        for direction in ("text_to_image", "image_to_text"):
            for k in (1, 5, 10):
                name = f"{direction}_R@{k}"
                assert {name, f"first_caption_{name}", f"caption_bank_{name}",
                        f"caption_bank_first_caption_{name}"} <= set(record)


def test_one_caption_per_image_adds_no_duplicate_figures(shapes_folder: Path, tmp_path: Path) -> None:
    trainer = _trainer(_write_manifest(shapes_folder, tmp_path / "pairs.jsonl", with_phrases=False), tmp_path / "run")
    record = trainer.evaluate()
    assert "text_to_image_R@10" in record
    assert not any("first_caption_" in name for name in record)
