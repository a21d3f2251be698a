"""The caption bank: its mixing against a plain reference, batching parity, and its life in a model directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from models import load_encoder
from models.caption_bank import BANK_FILE, CaptionBank
from models.checkpoint import CONFIG_NAME
from models.config import AugmentConfig, CaptionBankConfig, TrainConfig
from models.data import read_pairs
from models.encoder import create_model
from models.train import Trainer

from ..conftest import TINY


def _unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _reference(image: np.ndarray, bank: np.ndarray, config: CaptionBankConfig,
               values: np.ndarray | None = None) -> np.ndarray:
    """ConSE by hand, one image at a time: softmax over the k most similar captions, blended. With
    `values` (the image bank), the rows mixed are those of the nearest captions' `values` rows."""
    values = bank if values is None else values
    out = []
    for row in image:
        similarity = bank @ row
        top = np.argsort(-similarity, kind="stable")[: config.top_k]
        weights = np.exp((similarity[top] - similarity[top].max()) / config.temperature)
        weights /= weights.sum()
        mixture = (weights[:, None] * values[top]).sum(axis=0)
        mixture /= np.linalg.norm(mixture)
        mixed = config.blend * row + (1 - config.blend) * mixture
        out.append(mixed / np.linalg.norm(mixed))
    return np.stack(out)


def test_projection_matches_the_plain_reference_and_ignores_batching() -> None:
    config = CaptionBankConfig(top_k=5, temperature=0.1, blend=0.4)
    bank = CaptionBank(_unit(50, 16, seed=0), config)
    images = _unit(12, 16, seed=1)
    batched = bank.project(images).numpy()
    expected = _reference(images.double().numpy(), bank.embeddings.double().numpy(), config)
    np.testing.assert_allclose(batched, expected, atol=1e-5)
    one_by_one = np.concatenate([bank.project(images[i : i + 1]).numpy() for i in range(len(images))])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-6)


def test_projection_extremes() -> None:
    embeddings = _unit(30, 8, seed=2)
    images = _unit(6, 8, seed=3)
    own = CaptionBank(embeddings, CaptionBankConfig(blend=1.0)).project(images)
    torch.testing.assert_close(own, images)  # blend 1: the image tower alone
    nearest = CaptionBank(embeddings, CaptionBankConfig(top_k=1, blend=0.0)).project(images)
    torch.testing.assert_close(nearest, embeddings[(images @ embeddings.T).argmax(dim=1)])
    # more captions asked for than the bank holds: all of them are used
    assert CaptionBank(embeddings[:3], CaptionBankConfig(top_k=20)).project(images).shape == (6, 8)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"top_k": 0}, "top_k"), ({"temperature": 0.0}, "temperature"), ({"blend": 1.5}, "blend")],
)
def test_bad_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CaptionBankConfig(**settings)


def _train(data: Path, out: Path, lock_text: bool = True) -> Trainer:
    torch.manual_seed(0)
    loaded = create_model(TINY)
    config = TrainConfig(
        output_dir=out, epochs=2, batch_size=32, lr=2e-3, warmup_steps=5, val_fraction=0.25, lock_text=lock_text,
        caption_bank=CaptionBankConfig(top_k=3, temperature=0.1, blend=0.5),
        augment=AugmentConfig(color_jitter=0.0, grayscale=0.0), device="cpu", progress=False,
    )
    return Trainer(loaded, open_clip.get_tokenizer(loaded.registered_name), read_pairs(data), config)


def test_moving_a_bank_keeps_its_bits_and_its_digest() -> None:
    """`to(device)` moves the normalised embeddings as they are: normalising them again rounds
    differently on CUDA, and the digest (part of the model fingerprint) then depended on the
    device, so a CPU replica refused an index built on the GPU (seen on the lent H200)."""
    bank = CaptionBank(torch.randn(500, 64, generator=torch.Generator().manual_seed(4)), CaptionBankConfig())
    moved = bank.to("cpu")
    assert torch.equal(moved.embeddings, bank.embeddings)
    assert moved.digest() == bank.digest()
    assert moved.config == bank.config


@pytest.fixture(scope="module")
def banked_model(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    trainer = _train(shapes_folder, tmp_path_factory.mktemp("run"))
    return trainer, trainer.run().model_dir


def test_trained_model_ships_its_training_captions(banked_model, sample_images) -> None:
    trainer, model_dir = banked_model
    settings = json.loads((model_dir / CONFIG_NAME).read_text())["clipsearch"]["caption_bank"]
    assert settings == {"top_k": 3, "temperature": 0.1, "blend": 0.5, "size": len(trainer.train_examples.captions)}
    assert (model_dir / BANK_FILE).is_file()
    with_bank = load_encoder(model_dir, device="cpu")
    raw = load_encoder(model_dir, device="cpu", caption_bank=False)
    assert with_bank.caption_bank is not None and raw.caption_bank is None
    # the bank moves image embeddings, so the two are different spaces with different fingerprints
    assert with_bank.fingerprint != raw.fingerprint
    assert with_bank.fingerprint.weights_sha256 != raw.fingerprint.weights_sha256
    captions = raw.encode_texts(trainer.train_examples.captions)
    expected = _reference(raw.encode_images(sample_images).astype(np.float64), captions.astype(np.float64),
                          with_bank.caption_bank.config)
    np.testing.assert_allclose(with_bank.encode_images(sample_images), expected, atol=1e-4)
    np.testing.assert_array_equal(with_bank.encode_texts(["a red circle"]), raw.encode_texts(["a red circle"]))


def test_the_monitor_reports_both_spaces(banked_model) -> None:
    trainer, _ = banked_model
    last = trainer.metrics[-1]
    assert {"text_to_image_R@10", "caption_bank_text_to_image_R@10", "caption_bank_image_to_text_R@1"} <= set(last)


def assert_a_missing_file_is_named(model_dir: Path, name: str, tmp_path: Path) -> Path:
    """A copy of `model_dir` without its file `name` fails to load with an error naming the file;
    returns the copy."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    (copy / name).unlink()
    with pytest.raises(FileNotFoundError, match=Path(name).name):
        load_encoder(copy, device="cpu")
    return copy


def test_a_missing_bank_file_is_named(banked_model, tmp_path: Path) -> None:
    assert_a_missing_file_is_named(banked_model[1], BANK_FILE, tmp_path)


def test_a_bank_needs_a_locked_text_tower(shapes_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="locked text tower"):
        _train(shapes_folder, tmp_path / "run", lock_text=False)


def test_cli_trains_with_a_bank_and_scores_both_spaces(
    shapes_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from app.cli import main

    common = ["--model", TINY, "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet"]
    assert main(["train", str(shapes_folder), "--out", str(tmp_path / "unlocked"), "--caption-bank", *common]) == 2
    assert "locked text tower" in caplog.text
    assert main(["train", str(shapes_folder), "--out", str(tmp_path / "run"), "--lock-text", "--caption-bank",
                 *common]) == 0
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / BANK_FILE).is_file()
    reports = eval_reports(model_dir, shapes_folder, tmp_path, {"bank": [], "raw": ["--no-caption-bank"]})
    assert reports["bank"]["model"] != reports["raw"]["model"]
    assert reports["bank"]["images"] == reports["raw"]["images"] == 192


def eval_reports(model_dir: Path, data: Path, out: Path, variants: dict[str, list[str]]) -> dict[str, dict]:
    """`clipsearch eval` of `model_dir` on `data` once per variant (its extra arguments): the JSON reports."""
    from app.cli import main

    reports = {}
    for name, extra in variants.items():
        assert main(["eval", str(data), "--model", str(model_dir), "--quiet", "--json", str(out / f"{name}.json"),
                     *extra]) == 0
        reports[name] = json.loads((out / f"{name}.json").read_text())
    return reports


@pytest.mark.gpu
def test_a_banked_model_has_one_fingerprint_on_every_device(banked_model, sample_images) -> None:
    """An index built on a GPU must load in a CPU replica and the other way round."""
    _, model_dir = banked_model
    gpu, cpu = load_encoder(model_dir, device="cuda"), load_encoder(model_dir, device="cpu")
    assert gpu.fingerprint == cpu.fingerprint
    similarity = (gpu.encode_images(sample_images) * cpu.encode_images(sample_images)).sum(1)
    assert similarity.min() > 0.99
