"""The caption-bank loss's share of the trainer's loss: the weighted sum against the two losses
computed apart, a loss with no share not computed (nor, for the bank loss, its targets built), the
recipe's 0.5 bit for bit its old form, shares outside [0, 1] refused, a weighted run that resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import train as train_module
from models.loss import caption_bank_loss, clip_loss

from .test_train import (
    _config,
    _convolutional_trainer_and_batch,
    _trainer,
    assert_resumes_to_the_same_weights,
)


def _batch(trainer, dim: int = 8):
    """A bank of 6 captions, 4 images whose rows 2 and 3 share a caption, their one-hot bank targets."""
    torch.manual_seed(0)
    trainer.bank = F.normalize(torch.randn(6, dim), dim=-1)
    images = F.normalize(torch.randn(4, dim), dim=-1)
    ids = torch.tensor([0, 1, 2, 2])
    return images, trainer.bank[ids], ids, F.one_hot(ids, 6).float()


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.75, 1.0])
def test_the_bank_loss_takes_its_share_and_the_in_batch_loss_the_rest(shapes_folder: Path, tmp_path: Path,
                                                                      weight: float) -> None:
    trainer = _trainer(shapes_folder, _config(tmp_path / "run", lock_text=True, caption_bank_weight=weight))
    images, texts, ids, targets = _batch(trainer)
    scale = trainer.model.logit_scale
    in_batch = clip_loss(images, texts, scale, 0.0, ids)
    bank = caption_bank_loss(images, trainer.bank, targets, scale)
    assert not torch.isclose(in_batch, bank)  # else any share would pass
    got = trainer._contrast(images, texts, ids, targets)
    torch.testing.assert_close(got, (1.0 - weight) * in_batch + weight * bank)


@pytest.mark.parametrize(("weight", "skipped"), [(1.0, "clip_loss"), (0.0, "caption_bank_loss")])
def test_a_loss_whose_share_is_zero_is_not_computed(shapes_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch, weight: float,
                                                    skipped: str) -> None:
    """Weight 1.0 is the bank loss alone, 0.0 the in-batch loss alone, each without the other's
    work (and without a 0 * NaN that would poison the sum)."""
    trainer = _trainer(shapes_folder, _config(tmp_path / "run", lock_text=True, caption_bank_weight=weight))
    images, texts, ids, targets = _batch(trainer)
    scale = trainer.model.logit_scale
    expected = (caption_bank_loss(images, trainer.bank, targets, scale) if weight == 1.0
                else clip_loss(images, texts, scale, 0.0, ids))

    def not_needed(*args, **kwargs):
        raise AssertionError(f"{skipped} computed with a share of 0")

    monkeypatch.setattr(train_module, skipped, not_needed)
    assert torch.equal(trainer._contrast(images, texts, ids, targets), expected)


@pytest.mark.parametrize(("weight", "builds"), [(0.0, 0), (0.5, 1)])
def test_bank_targets_are_built_only_when_the_bank_loss_has_a_share(shapes_folder: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, weight: float,
                                                                   builds: int) -> None:
    """A whole batch through `_loss`: with weight 0 the (batch, captions) bank targets are never
    built and the loss is the in-batch loss alone; with 0.5 they are built once."""
    trainer, (images, image_ids, caption_ids) = _convolutional_trainer_and_batch(
        shapes_folder, tmp_path, caption_bank_weight=weight)
    built = []
    real = train_module.soft_targets

    def counted(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "soft_targets", counted)
    trainer.model.eval()  # no dropout: the reference below sees the same features
    got = trainer._loss(images, image_ids, caption_ids)
    assert len(built) == builds
    if weight == 0.0:
        features = F.normalize(trainer.model.encode_image(images).float(), dim=-1)
        expected = clip_loss(features, trainer.bank[caption_ids], trainer.model.logit_scale, 0.0, caption_ids)
        torch.testing.assert_close(got, expected)


def test_the_recipes_even_share_is_the_old_mean_bit_for_bit(shapes_folder: Path, tmp_path: Path) -> None:
    """The committed model was trained with 0.5 * (in-batch + bank): the weighted form must not change it."""
    trainer = _trainer(shapes_folder, _config(tmp_path / "run", lock_text=True))
    assert trainer.config.caption_bank_weight == 0.5
    images, texts, ids, targets = _batch(trainer)
    scale = trainer.model.logit_scale
    old = 0.5 * (clip_loss(images, texts, scale, 0.0, ids) + caption_bank_loss(images, trainer.bank, targets, scale))
    assert torch.equal(trainer._contrast(images, texts, ids, targets), old)


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_a_share_outside_zero_to_one_is_refused_before_the_images_are_decoded(
    shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight: float
) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded images before refusing the setting")

    monkeypatch.setattr(train_module, "decode_pairs", no_decoding)
    with pytest.raises(ValueError, match=r"caption_bank_weight must lie in \[0, 1\]"):
        _trainer(shapes_folder, _config(tmp_path / "run", lock_text=True, caption_bank_weight=weight))


def test_a_weighted_run_resumes_to_the_same_weights(shapes_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert_resumes_to_the_same_weights(shapes_folder, tmp_path, monkeypatch, "caption_bank_weight", 0.75, 0.5)
