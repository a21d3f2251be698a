"""The image bank: its rows and mixing against plain references, batching parity, its life in a
model directory, and where it applies (captions as documents of image -> text, never queries)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from models import load_encoder
from models.caption_bank import BANK_FILE as CAPTION_BANK_FILE
from models.caption_bank import CaptionBank
from models.checkpoint import CONFIG_NAME
from models.config import CaptionBankConfig, ImageBankConfig
from models.data import Pair, read_pairs
from models.evaluate import evaluate
from models.image_bank import BANK_FILE, ImageBank, build_image_bank, image_rows
from models.metrics import retrieval_recall
from models.train import Trainer

from ..conftest import TINY
from .test_caption_bank import _reference, _train, _unit, assert_a_missing_file_is_named, eval_reports


def test_projection_matches_the_plain_reference_and_ignores_batching() -> None:
    config = ImageBankConfig(top_k=4, temperature=0.1, blend=0.3)
    keys = CaptionBank(_unit(40, 16, seed=0), CaptionBankConfig())
    bank = ImageBank(_unit(40, 16, seed=1), keys, config)
    captions = _unit(9, 16, seed=2)
    batched = bank.project(captions).numpy()
    expected = _reference(captions.double().numpy(), keys.embeddings.double().numpy(), config,
                          values=bank.embeddings.double().numpy())
    np.testing.assert_allclose(batched, expected, atol=1e-5)
    one_by_one = np.concatenate([bank.project(captions[i : i + 1]).numpy() for i in range(len(captions))])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    # nearest by the keys, mixed from the values: with one neighbour and no blend, the value row
    nearest = ImageBank(bank.embeddings, keys, ImageBankConfig(top_k=1, blend=0.0)).project(captions)
    torch.testing.assert_close(nearest, bank.embeddings[(captions @ keys.embeddings.T).argmax(dim=1)])


def test_rows_are_the_mean_of_each_captions_images() -> None:
    images = _unit(5, 8, seed=3)
    captions_of = [[0], [0, 1], [2], [1], [2, 0]]
    rows = image_rows(images * 3.0, captions_of, 3)  # not yet unit norm: normalised first
    for caption in range(3):
        owners = [i for i, owned in enumerate(captions_of) if caption in owned]
        mean = images[owners].mean(dim=0)
        torch.testing.assert_close(rows[caption], mean / mean.norm())
    with pytest.raises(ValueError, match="1 of 4 captions have no readable image"):
        image_rows(images, captions_of, 4)


def test_a_bank_needs_one_row_per_key_and_sane_settings() -> None:
    keys = CaptionBank(_unit(10, 8, seed=4), CaptionBankConfig())
    with pytest.raises(ValueError, match="one row per caption-bank row"):
        ImageBank(_unit(9, 8, seed=5), keys, ImageBankConfig())
    with pytest.raises(ValueError, match="image bank blend"):
        ImageBankConfig(blend=-0.1)
    moved = ImageBank(_unit(10, 8, seed=5), keys, ImageBankConfig()).to("cpu")
    assert moved.digest() == ImageBank(_unit(10, 8, seed=5), keys, ImageBankConfig()).digest()


@pytest.fixture(scope="module")
def banked(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    """A tiny trained model with a caption bank and, attached afterwards, an image bank."""
    trainer = _train(shapes_folder, tmp_path_factory.mktemp("run"))
    model_dir = trainer.run().model_dir
    encoder = load_encoder(model_dir, device="cpu")
    bank, skipped = build_image_bank(encoder, trainer.train_examples.as_pairs(), ImageBankConfig(top_k=3, blend=0.5))
    assert not skipped
    bank.attach(model_dir)
    return trainer, model_dir


def test_the_bank_is_the_trained_images_under_the_model(banked, sample_images) -> None:
    trainer, model_dir = banked
    full, plain = load_encoder(model_dir, device="cpu"), load_encoder(model_dir, device="cpu", image_bank=False)
    assert full.image_bank is not None and plain.image_bank is None and plain.caption_bank is not None
    recorded = json.loads((model_dir / CONFIG_NAME).read_text())["clipsearch"]
    rows = len(trainer.train_examples.captions)
    assert recorded["image_bank"] == {**asdict(full.image_bank.config), "size": rows} and len(full.image_bank) == rows
    # each row: the mean of its caption's training images as the model (caption bank on) embeds them
    from models.images import load_image

    examples = trainer.train_examples
    embedded = torch.from_numpy(plain.encode_images([load_image(p) for p in examples.images]))
    for caption in range(0, len(examples.captions), 3):
        owners = [i for i, c in examples.pairs if c == caption]
        mean = embedded[sorted(set(owners))].mean(dim=0)
        torch.testing.assert_close(full.image_bank.embeddings[caption], mean / mean.norm(), atol=1e-5, rtol=0)
    # it moves captions embedded as documents only: queries and images stay as they were
    texts = ["a red circle", "a blue square", "a green triangle", "something else entirely"]
    np.testing.assert_array_equal(full.encode_texts(texts), plain.encode_texts(texts))
    np.testing.assert_array_equal(full.encode_images(sample_images), plain.encode_images(sample_images))
    np.testing.assert_array_equal(plain.encode_captions(texts), plain.encode_texts(texts))
    documents = full.encode_captions(texts)
    expected = _reference(plain.encode_texts(texts).astype(np.float64),
                          full.caption_bank.embeddings.double().numpy(), full.image_bank.config,
                          values=full.image_bank.embeddings.double().numpy())
    np.testing.assert_allclose(documents, expected, atol=1e-5)
    one_by_one = np.concatenate([full.encode_captions([t]) for t in texts])
    np.testing.assert_allclose(documents, one_by_one, atol=1e-6)
    # another space for an image -> text index: another fingerprint
    assert full.fingerprint != plain.fingerprint
    # built through the caption bank, so it goes with it
    assert load_encoder(model_dir, device="cpu", caption_bank=False).image_bank is None


def test_evaluation_scores_image_to_text_against_documents(banked, shapes_folder: Path) -> None:
    _, model_dir = banked
    encoder = load_encoder(model_dir, device="cpu")
    pair_set = read_pairs(shapes_folder)
    pairs = pair_set.pairs[::7]
    report = evaluate(encoder, type(pair_set)(pairs, pair_set.root), progress=False)
    from models.images import load_image

    unique = list(dict.fromkeys(p.image for p in pairs))
    owners = np.asarray([unique.index(p.image) for p in pairs])
    images = encoder.encode_images([load_image(p) for p in unique])
    texts = [p.caption for p in pairs]
    as_queries = retrieval_recall(images, encoder.encode_texts(texts), owners)
    as_documents = retrieval_recall(images, encoder.encode_captions(texts), owners)
    for key, value in report.recall.items():
        assert value == (as_documents if key.startswith("image_to_text") else as_queries)[key], key


def test_building_checks_the_pairs_and_skips_unreadable_images(banked, tmp_path: Path) -> None:
    trainer, model_dir = banked
    encoder = load_encoder(model_dir, device="cpu", image_bank=False)
    pairs = trainer.train_examples.as_pairs()
    # a corrupt image under a known caption: skipped and counted, the bank as without it
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bank, skipped = build_image_bank(encoder, [*pairs, Pair(broken, pairs[0].caption)], ImageBankConfig(top_k=3))
    assert sum(skipped.values()) == 1 and next(iter(skipped)).startswith("bad_image:")
    reference, _ = build_image_bank(encoder, pairs, ImageBankConfig(top_k=3))
    torch.testing.assert_close(bank.embeddings, reference.embeddings)
    # pairs the model was not trained on: their captions are not the caption bank's rows
    with pytest.raises(ValueError, match="distinct captions"):
        build_image_bank(encoder, pairs[: len(pairs) // 4], ImageBankConfig())
    renamed = [Pair(p.image, p.caption.replace("red", "crimson")) for p in pairs]
    with pytest.raises(ValueError, match="not the caption bank's rows"):
        build_image_bank(encoder, renamed, ImageBankConfig())
    without = load_encoder(model_dir, device="cpu", caption_bank=False)
    with pytest.raises(ValueError, match="needs a model with a caption bank"):
        build_image_bank(without, pairs, ImageBankConfig())


def test_broken_bank_directories_are_named(banked, tmp_path: Path) -> None:
    _, model_dir = banked
    copy = assert_a_missing_file_is_named(model_dir, BANK_FILE, tmp_path)
    shutil.copytree(model_dir, copy, dirs_exist_ok=True)
    config = json.loads((copy / CONFIG_NAME).read_text())
    config["clipsearch"]["image_bank"]["size"] += 1
    (copy / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rows, its config says"):
        load_encoder(copy, device="cpu")
    del config["clipsearch"]["caption_bank"]
    (copy / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no caption bank"):
        load_encoder(copy, device="cpu")


def test_attaching_again_replaces_the_bank(banked, tmp_path: Path) -> None:
    trainer, model_dir = banked
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    encoder = load_encoder(copy, device="cpu", image_bank=False)
    bank, _ = build_image_bank(encoder, trainer.train_examples.as_pairs(), ImageBankConfig(top_k=1, blend=0.9))
    bank.attach(copy)
    again = load_encoder(copy, device="cpu")
    assert again.image_bank is not None and again.image_bank.config == ImageBankConfig(top_k=1, blend=0.9)
    assert again.fingerprint != load_encoder(model_dir, device="cpu").fingerprint


def test_an_attached_bank_is_stored_in_its_caption_banks_precision(banked, tmp_path: Path) -> None:
    """The committed model keeps its caption bank in float16: an image bank attached to it is stored
    so too, one precision for both banks (read from the caption bank's file header)."""
    trainer, model_dir = banked
    assert load_file(str(model_dir / BANK_FILE))["embeddings"].dtype == torch.float32
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    keys = load_file(str(copy / CAPTION_BANK_FILE))["embeddings"]
    save_file({"embeddings": keys.half()}, str(copy / CAPTION_BANK_FILE))
    bank, _ = build_image_bank(load_encoder(model_dir, device="cpu", image_bank=False),
                               trainer.train_examples.as_pairs(), ImageBankConfig(top_k=3, blend=0.5))
    bank.attach(copy)
    stored = load_file(str(copy / BANK_FILE))["embeddings"]
    assert stored.dtype == torch.float16
    assert torch.allclose(stored.float(), load_file(str(model_dir / BANK_FILE))["embeddings"], atol=1e-3)


def test_cli_trains_with_an_image_bank(shapes_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`clipsearch train --caption-bank --image-bank` ships both banks, the image bank built from the
    run's own training pairs after training; without a caption bank it is refused before training."""
    from app.cli import main
    from models.data import split_pairs

    common = ["--model", TINY, "--epochs", "1", "--batch-size", "32", "--device", "cpu", "--quiet",
              "--val-fraction", "0.25", "--seed", "0", "--lock-text"]
    assert main(["train", str(shapes_folder), "--out", str(tmp_path / "no"), "--image-bank", *common]) == 2
    assert "--image-bank needs --caption-bank" in caplog.text and not (tmp_path / "no").exists()
    assert main(["train", str(shapes_folder), "--out", str(tmp_path / "run"), "--caption-bank", "--image-bank",
                 *common]) == 0
    model_dir = tmp_path / "run" / "model"
    shipped = load_encoder(model_dir, device="cpu")
    assert shipped.image_bank is not None and shipped.image_bank.config == ImageBankConfig()
    trained, _ = split_pairs(read_pairs(shapes_folder), 0.25, 0)
    rebuilt, _ = build_image_bank(load_encoder(model_dir, device="cpu", image_bank=False), trained, ImageBankConfig())
    torch.testing.assert_close(shipped.image_bank.embeddings, rebuilt.embeddings)
    reports = eval_reports(model_dir, shapes_folder, tmp_path, {"both": [], "captions only": ["--no-image-bank"]})
    assert reports["both"]["model"] != reports["captions only"]["model"]
    # text -> image never passes through the image bank
    both, plain = reports["both"]["recall"], reports["captions only"]["recall"]
    assert all(both[k] == plain[k] for k in both if k.startswith("text_to_image"))


@pytest.mark.gpu
def test_an_image_bank_has_one_fingerprint_on_every_device(banked) -> None:
    """As for the caption bank: a caption index built on a GPU must load in a CPU replica."""
    _, model_dir = banked
    gpu, cpu = load_encoder(model_dir, device="cuda"), load_encoder(model_dir, device="cpu")
    assert gpu.fingerprint == cpu.fingerprint
    texts = ["a red circle", "a blue square", "a dog"]
    assert (gpu.encode_captions(texts) * cpu.encode_captions(texts)).sum(1).min() > 0.99
