"""Distillation: the loss against its definition, a teacher that pulls the model toward itself,
teachers that cannot teach refused, and a taught run that resumes to the same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models import train as train_module
from models.checkpoint import FULL_WEIGHTS_NAME
from models.data import read_pairs
from models.encoder import create_model
from models.loss import distillation_loss
from models.monitor import embed_captions
from models.train import Trainer

from ..conftest import TINY
from .test_train import _config, _interrupted_locked_run, _trainer, assert_resumes_to_the_same_weights


def test_distillation_loss_is_the_cross_entropy_to_the_teachers_bank_distribution() -> None:
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(9, 6), dim=-1)
    teacher = F.normalize(torch.randn(4, 6), dim=-1)
    student = F.normalize(torch.randn(4, 6), dim=-1).requires_grad_(True)
    got = distillation_loss(student, teacher, bank, temperature=0.1)
    want_t = torch.exp(teacher @ bank.T / 0.1)
    want_t = want_t / want_t.sum(dim=1, keepdim=True)
    want_s = torch.exp(student @ bank.T / 0.1)
    want_s = want_s / want_s.sum(dim=1, keepdim=True)
    kl = (want_t * (want_t.log() - want_s.log())).sum(dim=1).mean()
    entropy = -(want_t * want_t.log()).sum(dim=1).mean()
    torch.testing.assert_close(got, kl + entropy)
    # at the teacher's own features the loss is at its minimum: no gradient left
    at_teacher = teacher.clone().requires_grad_(True)
    distillation_loss(at_teacher, teacher, bank, temperature=0.1).backward()
    assert at_teacher.grad is not None and float(at_teacher.grad.abs().max()) < 1e-6


@pytest.fixture(scope="module")
def teacher_dir(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained locked-text model of the same text tower as `_trainer`'s (seed 0)."""
    trainer = _trainer(shapes_folder, _config(tmp_path_factory.mktemp("teacher"), epochs=6, lock_text=True))
    return trainer.run().model_dir


def _bank_distributions(trainer: Trainer, features: torch.Tensor) -> torch.Tensor:
    assert trainer.bank is not None
    return F.softmax(features @ trainer.bank.T / trainer.config.distill_temperature, dim=-1)


def test_a_teacher_pulls_the_model_toward_its_distribution(shapes_folder: Path, teacher_dir: Path,
                                                         tmp_path: Path) -> None:
    student = _trainer(shapes_folder, _config(tmp_path / "run", epochs=4, lock_text=True, teacher=teacher_dir,
                                               distill_weight=1.0))
    assert student.teacher is not None
    images = torch.stack([student.dataset[i][0] for i in range(0, len(student.dataset), 8)])

    def divergence() -> float:
        student.model.eval()
        with torch.no_grad():
            ours = F.normalize(student.model.encode_image(images).float(), dim=-1)
            want = _bank_distributions(student, student.teacher.features(images))
            got = _bank_distributions(student, ours)
        return float((want * (want.log() - got.log())).sum(dim=1).mean())

    student.bank = embed_captions(student.model, student.tokenizer, student.train_examples.captions,
                                               student.device)
    before = divergence()
    # with all the weight on the teacher, the trainer's loss is the distillation loss alone
    image_ids, caption_ids = (torch.tensor([student.dataset[i][k] for i in range(0, len(student.dataset), 8)])
                              for k in (1, 2))
    with torch.no_grad():
        features = F.normalize(student.model.encode_image(images).float(), dim=-1)
        want = distillation_loss(features, student.teacher.features(images), student.bank, 0.05)
        torch.testing.assert_close(student._loss(images, image_ids, caption_ids), want)
    student.run()
    assert divergence() < 0.5 * before, before


def test_teachers_that_cannot_teach_are_refused_before_the_images_are_decoded(
    shapes_folder: Path, teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded images before refusing the teacher")

    monkeypatch.setattr(train_module, "decode_pairs", no_decoding)
    with pytest.raises(ValueError, match="needs a locked text tower"):
        _trainer(shapes_folder, _config(tmp_path / "a", teacher=teacher_dir))
    with pytest.raises(ValueError, match="distill_weight must lie in"):
        _trainer(shapes_folder, _config(tmp_path / "b", lock_text=True, teacher=teacher_dir, distill_weight=1.5))
    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        _trainer(shapes_folder, _config(tmp_path / "c", lock_text=True, teacher=tmp_path))
    torch.manual_seed(1)  # another text tower than the teacher's (seed 0)
    loaded = create_model(TINY)
    with pytest.raises(ValueError, match="has another text tower"):
        Trainer(loaded, open_clip.get_tokenizer(loaded.registered_name), read_pairs(shapes_folder),
                _config(tmp_path / "d", lock_text=True, teacher=teacher_dir))
    torch.manual_seed(0)
    loaded = create_model(TINY)
    with pytest.raises(ValueError, match=r"expects other pixels: mean"):
        Trainer(loaded, open_clip.get_tokenizer(loaded.registered_name), read_pairs(shapes_folder),
                _config(tmp_path / "e", lock_text=True, teacher=teacher_dir), {"mean": (0.5, 0.5, 0.5)})


def test_a_taught_run_resumes_to_the_same_weights_and_only_with_its_teacher(
    shapes_folder: Path, teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert_resumes_to_the_same_weights(shapes_folder, tmp_path, monkeypatch, "teacher", teacher_dir, None)

    # the same teacher directory, other weights in it: refused, not silently taught by another model
    copied = tmp_path / "teacher"
    shutil.copytree(teacher_dir, copied)
    _interrupted_locked_run(shapes_folder, tmp_path / "other", monkeypatch, after_saves=1, teacher=copied)
    # the same weights named by another path (a run moved, a teacher copied) are the same teacher
    renamed = _trainer(shapes_folder, _config(tmp_path / "other", epochs=4, lock_text=True, checkpoint_every=5,
                                              teacher=teacher_dir.resolve()))
    assert renamed.try_resume()
    # no teacher at all is another recipe
    untaught = _trainer(shapes_folder, _config(tmp_path / "other", epochs=4, lock_text=True, checkpoint_every=5))
    with pytest.raises(ValueError, match="other settings"):
        untaught.try_resume()
    weights = copied / FULL_WEIGHTS_NAME
    tensors = load_file(weights)
    name = next(k for k in tensors if k.startswith("visual.") and tensors[k].is_floating_point())
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    other = _trainer(shapes_folder, _config(tmp_path / "other", epochs=4, lock_text=True, checkpoint_every=5,
                                            teacher=copied))
    with pytest.raises(ValueError, match="was taught by other weights"):
        other.try_resume()
