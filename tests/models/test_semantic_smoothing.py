"""Semantic smoothing of the caption-bank targets: the targets against their definition, the
trainer's bank loss built on them, settings that cannot apply refused, a smoothed run that resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import train as train_module
from models.loss import semantic_smoothing

from .test_train import _config, _trainer, assert_resumes_to_the_same_weights


def _dense_reference(targets: torch.Tensor, bank: torch.Tensor, weight: float, temperature: float) -> torch.Tensor:
    """Every caption's neighbours at once, (N, N): the plain form of what the loss computes per batch."""
    return (1.0 - weight) * targets + weight * targets @ F.softmax(bank @ bank.T / temperature, dim=-1)


def test_smoothing_moves_its_share_of_each_target_onto_the_captions_text_neighbours() -> None:
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(5, 8), dim=-1)
    targets = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0]])  # one caption; two captions
    got = semantic_smoothing(targets, bank, weight=0.3, temperature=0.1)
    for row in range(2):  # written out: each own caption hands 0.3 of its mass to a softmax of its similarities
        want = 0.7 * targets[row]
        for own in range(5):
            similarity = torch.tensor([float(bank[own] @ bank[other]) for other in range(5)])
            want = want + 0.3 * targets[row, own] * torch.exp(similarity / 0.1) / torch.exp(similarity / 0.1).sum()
        torch.testing.assert_close(got[row], want)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(2))  # still distributions
    assert bool((got[0, 0] > got[0, 1:]).all())  # a caption keeps the largest share of its own mass
    assert torch.equal(semantic_smoothing(targets, bank, weight=0.0, temperature=0.1), targets)
    # a cold temperature keeps the mass at home: nothing moves
    torch.testing.assert_close(semantic_smoothing(targets, bank, 1.0, temperature=1e-3), targets)


def test_per_batch_neighbours_equal_the_whole_banks() -> None:
    """Only the batch's own captions get neighbours computed; the result is the dense form's."""
    torch.manual_seed(1)
    bank = F.normalize(torch.randn(300, 16), dim=-1)
    targets = torch.zeros(8, 300)
    for row in range(8):  # one to three captions per image, some shared between images
        own = torch.randint(0, 40, (1 + row % 3,)).unique()
        targets[row, own] = 1.0 / len(own)
    torch.testing.assert_close(semantic_smoothing(targets, bank, 0.6, 0.07), _dense_reference(targets, bank, 0.6, 0.07))


def test_the_trainers_bank_loss_takes_the_smoothed_targets(shapes_folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[torch.Tensor]] = {"own": [], "used": []}
    own_targets, bank_loss = train_module.soft_targets, train_module.caption_bank_loss

    def record_own(*args, **kwargs):
        seen["own"].append(own_targets(*args, **kwargs))
        return seen["own"][-1]

    def record_used(features, bank, targets, scale):
        seen["used"].append(targets)
        return bank_loss(features, bank, targets, scale)

    monkeypatch.setattr(train_module, "soft_targets", record_own)
    monkeypatch.setattr(train_module, "caption_bank_loss", record_used)
    trainer = _trainer(shapes_folder, _config(tmp_path / "run", epochs=1, max_steps=2, lock_text=True,
                                              semantic_smoothing=0.6, semantic_temperature=0.1))
    trainer.run()
    assert trainer.bank is not None and len(seen["used"]) == 2
    for own, used in zip(seen["own"], seen["used"], strict=True):
        torch.testing.assert_close(used, _dense_reference(own, trainer.bank, 0.6, 0.1))
        assert not torch.equal(used, own)


@pytest.mark.parametrize(("settings", "message"), [
    ({"semantic_smoothing": 0.5}, "needs a locked text tower"),
    ({"semantic_smoothing": 0.5, "lock_text": True, "caption_bank_loss": False}, "the caption-bank loss"),
    ({"semantic_smoothing": 1.5, "lock_text": True}, r"must lie in \[0, 1\]"),
    ({"semantic_smoothing": -0.1, "lock_text": True}, r"must lie in \[0, 1\]"),
    ({"semantic_smoothing": 0.5, "semantic_temperature": 0.0, "lock_text": True}, "must be positive"),
])
def test_smoothing_that_cannot_apply_is_refused_before_the_images_are_decoded(
    shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict, message: str
) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded images before refusing the settings")

    monkeypatch.setattr(train_module, "decode_pairs", no_decoding)
    with pytest.raises(ValueError, match=message):
        _trainer(shapes_folder, _config(tmp_path / "run", **settings))


def test_a_smoothed_run_resumes_to_the_same_weights(shapes_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert_resumes_to_the_same_weights(shapes_folder, tmp_path, monkeypatch, "semantic_smoothing", 0.6, 0.0)
