"""Contrastive training: it learns, it skips and counts bad data, it resumes after `kill -9`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from models import load_encoder
from models import train as train_module
from models.checkpoint import FULL_WEIGHTS_NAME
from models.config import AugmentConfig, TrainConfig
from models.data import Pair, read_pairs
from models.encoder import create_model
from models.monitor import embed_captions, evaluate_pairs
from models.towers import set_train_mode
from models.train import Trainer, soft_targets
from models.train_data import Examples

from ..conftest import TINY, make_shapes_folder


def _config(out: Path, **overrides) -> TrainConfig:
    values = dict(
        output_dir=out, epochs=25, batch_size=32, lr=2e-3, warmup_steps=10, val_fraction=0.25,
        checkpoint_every=50, augment=AugmentConfig(scale=(0.8, 1.0), color_jitter=0.0, grayscale=0.0),
        device="cpu", progress=False, seed=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def _trainer(data: Path, config: TrainConfig) -> Trainer:
    torch.manual_seed(0)
    loaded = create_model(TINY)
    return Trainer(loaded, open_clip.get_tokenizer(loaded.registered_name), read_pairs(data), config)


@pytest.fixture(scope="module")
def trained(shapes_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    trainer = _trainer(shapes_folder, _config(tmp_path_factory.mktemp("run")))
    return trainer, trainer.run()


def test_loss_falls_and_recall_rises_above_chance(trained) -> None:
    trainer, result = trained
    first, last = result.metrics[0], result.metrics[-1]
    assert last["train_loss"] < 0.6 * first["train_loss"]
    held_images = len(trainer.held_examples.images)
    chance_r5 = 5 / held_images
    # 8 classes: a model that tells colour and shape apart fills the top 5 with the right class
    assert last["text_to_image_R@5"] > 3 * chance_r5, (last, held_images)
    assert last["text_to_image_R@5"] > first["text_to_image_R@5"]
    metrics = json.loads((trainer.config.output_dir / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 25 and metrics["held_out_pairs"] == len(trainer.held_examples.pairs)


def test_trained_model_dir_loads_everywhere(trained, sample_images) -> None:
    _, result = trained
    encoder = load_encoder(result.model_dir, device="cpu")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{result.model_dir}")
    with torch.inference_mode():
        theirs = model.eval().encode_image(torch.stack([preprocess(i) for i in sample_images]), normalize=True)
    np.testing.assert_allclose(theirs.numpy(), encoder.encode_images(sample_images), atol=1e-5)


def test_bad_rows_and_images_skipped_and_counted(tmp_path: Path) -> None:
    data = make_shapes_folder(tmp_path / "data", per_class=4)
    (data / "red_circle" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (data / "red_circle" / "corrupt.txt").write_text("a broken picture")
    (data / "red_circle" / "empty.png").write_bytes(b"")
    (data / "red_circle" / "empty.txt").write_text("nothing here")
    (data / "red_circle" / "nocaption.png").write_bytes((data / "red_circle" / "000.png").read_bytes())
    (data / "red_circle" / "blank.png").write_bytes((data / "red_circle" / "000.png").read_bytes())
    (data / "red_circle" / "blank.txt").write_text("\n")
    trainer = _trainer(data, _config(tmp_path / "run", epochs=1, batch_size=8))
    assert dict(trainer.skipped) == {
        "missing_caption": 1, "empty_caption": 1, "bad_image:invalid_image": 1, "bad_image:empty": 1,
    }
    assert len(trainer.train_examples.pairs) + len(trainer.held_examples.pairs) == 32
    rejects = json.loads((tmp_path / "run" / "rejects.json").read_text())
    assert sorted(Path(r["image"]).name for r in rejects) == ["corrupt.png", "empty.png"]
    result = trainer.run()  # and the run goes through
    assert result.steps > 0


def test_locked_text_tower_stays_put(shapes_folder: Path, tmp_path: Path) -> None:
    trainer = _trainer(shapes_folder, _config(tmp_path / "run", epochs=1, lock_text=True))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    text_keys = [k for k in before if not k.startswith(("visual.", "logit_"))]
    image_keys = [k for k in before if k.startswith("visual.")]
    assert text_keys and image_keys
    assert all(torch.equal(before[k], after[k]) for k in text_keys)
    assert any(not torch.equal(before[k], after[k]) for k in image_keys)


def test_locked_text_tower_embeds_the_held_out_captions_once(
    shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(shapes_folder, _config(tmp_path / "run", epochs=3, lock_text=True))
    calls: list[int] = []
    embed = train_module.embed_captions

    def counting(model, tokenizer, captions, device, *args, **kwargs):
        calls.append(len(captions))
        return embed(model, tokenizer, captions, device, *args, **kwargs)

    monkeypatch.setattr(train_module, "embed_captions", counting)
    result = trainer.run()
    # once for the training captions (the bank), once for the held-out ones: not once an epoch
    assert len(result.metrics) == 3
    assert calls == [len(trainer.train_examples.captions), len(trainer.held_examples.captions)]
    # the cached captions score exactly as captions embedded afresh
    fresh = evaluate_pairs(trainer.model, trainer.tokenizer, trainer.eval_preprocess, trainer.held_examples,
                           trainer.held_cache, trainer.device)
    assert trainer.evaluate() == fresh


def _train_command(data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "app.cli", "train", str(data), "--out", str(out), "--model", TINY,
        "--epochs", "6", "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "5",
        "--checkpoint-every", "3", "--val-fraction", "0.25", "--device", "cpu", "--quiet",
    ]


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    data = make_shapes_folder(tmp_path / "data", per_class=8)  # 64 pairs -> 3 steps an epoch
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    reference = tmp_path / "reference"
    subprocess.run(_train_command(data, reference), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_train_command(data, killed), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((killed / "checkpoints").glob("step_00000006.pt")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_train_command(data, killed), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step_" in resumed.stderr

    want = load_file(str(reference / "model" / FULL_WEIGHTS_NAME))
    got = load_file(str(killed / "model" / FULL_WEIGHTS_NAME))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    history = json.loads((killed / "metrics.json").read_text())["epochs"]
    assert [e["epoch"] for e in history] == list(range(1, 7))


class _Interrupted(Exception):
    pass


def _interrupted_locked_run(data: Path, out: Path, monkeypatch: pytest.MonkeyPatch, after_saves: int,
                            **overrides) -> Trainer:
    """A locked-text run stopped (as by a kill) right after its `after_saves`-th checkpoint."""
    saves: list[Path] = []
    save = train_module.checkpoint.save_train_state

    def save_then_stop(*args, **kwargs):
        saves.append(save(*args, **kwargs))
        if len(saves) == after_saves:
            raise _Interrupted
        return saves[-1]

    trainer = _trainer(data, _config(out, epochs=4, lock_text=True, checkpoint_every=5, **overrides))
    with monkeypatch.context() as patched:
        patched.setattr(train_module.checkpoint, "save_train_state", save_then_stop)
        with pytest.raises(_Interrupted):
            trainer.run()
    return trainer


def test_checkpoints_leave_the_locked_tower_out_and_resume_to_the_same_weights(
    shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = _trainer(shapes_folder, _config(tmp_path / "reference", epochs=4, lock_text=True,
                                                checkpoint_every=5))
    reference.run()
    stopped = _interrupted_locked_run(shapes_folder, tmp_path / "run", monkeypatch, after_saves=2)
    saved = torch.load(train_module.checkpoint.latest_train_state(tmp_path / "run"), weights_only=False)
    assert stopped.locked_keys and not stopped.locked_keys & saved["model"].keys()
    assert all(k.startswith(("visual.", "logit_")) for k in saved["model"])
    assert saved["locked"]["tensors"] == len(stopped.locked_keys)

    resumed = _trainer(shapes_folder, _config(tmp_path / "run", epochs=4, lock_text=True, checkpoint_every=5))
    assert resumed.try_resume() and resumed.progress.step == saved["progress"]["step"] > 0
    resumed = _trainer(shapes_folder, _config(tmp_path / "run", epochs=4, lock_text=True, checkpoint_every=5))
    resumed.run()
    want, got = reference.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_resume_refuses_a_locked_tower_with_other_weights(
    shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The locked tower is reloaded from its source on resume, so a replaced source is caught."""
    _interrupted_locked_run(shapes_folder, tmp_path / "run", monkeypatch, after_saves=1)
    torch.manual_seed(1)  # another text tower than the run started with (seed 0)
    loaded = create_model(TINY)
    other = Trainer(loaded, open_clip.get_tokenizer(loaded.registered_name), read_pairs(shapes_folder),
                    _config(tmp_path / "run", epochs=4, lock_text=True, checkpoint_every=5))
    with pytest.raises(ValueError, match="other weights of its locked tower"):
        other.try_resume()


def test_a_checkpoint_holding_every_weight_still_resumes(
    shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints written before the locked towers were left out hold the whole model."""
    stopped = _interrupted_locked_run(shapes_folder, tmp_path / "run", monkeypatch, after_saves=1)
    path = train_module.checkpoint.latest_train_state(tmp_path / "run")
    state = torch.load(path, weights_only=False)
    state["model"] = stopped.model.state_dict()
    del state["locked"]
    torch.save(state, path)
    resumed = _trainer(shapes_folder, _config(tmp_path / "run", epochs=4, lock_text=True, checkpoint_every=5))
    assert resumed.try_resume()
    for key, value in stopped.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_mixup_off_draws_nothing_and_on_draws_a_partner_for_every_image() -> None:
    state = torch.get_rng_state()
    assert train_module.draw_mixing(8, 0.0) is None
    assert torch.equal(torch.get_rng_state(), state)  # a recipe without mixup keeps its random stream
    lam, partner = train_module.draw_mixing(8, 0.4)
    assert 0.0 <= lam <= 1.0 and sorted(partner.tolist()) == list(range(8))


def test_mixed_loss_equals_plainly_blended_targets(shapes_folder: Path, tmp_path: Path) -> None:
    """The trainer's mixup loss (a blend of two pairings' losses) against the definition: one
    cross-entropy per direction with each image's targets spread lambda : 1 - lambda over its own
    and its partner's captions, and each caption's over the images holding it in either role."""
    import torch.nn.functional as F

    trainer = _trainer(shapes_folder, _config(tmp_path / "run", epochs=3, lock_text=True))
    trainer.run()  # trained a little, so that images differ enough for their targets to matter
    items = [trainer.dataset[i] for i in range(0, len(trainer.dataset), len(trainer.dataset) // 12)][:12]
    images = torch.stack([item[0] for item in items])
    image_ids, caption_ids = (torch.tensor([item[k] for item in items]) for k in (1, 2))
    assert len(set(caption_ids.tolist())) == 8  # all eight captions, some rows sharing one: positives of each other
    lam, partner = 0.7, torch.tensor([5, 0, 9, 1, 11, 2, 4, 3, 10, 6, 8, 7])
    trainer.model.eval()  # no dropout: both computations see the same features
    got = trainer._loss(images, image_ids, caption_ids, (lam, partner))

    features = F.normalize(trainer.model.encode_image(images).float(), dim=-1)
    scale = trainer.model.logit_scale.exp()
    logits = scale * features @ trainer.bank[caption_ids].T  # (B, B): image i, caption row j

    def spread(mask: torch.Tensor) -> torch.Tensor:
        mask = mask.float()
        return mask / mask.sum(dim=1, keepdim=True)

    same = caption_ids[:, None] == caption_ids[None, :]
    image_targets = lam * spread(same) + (1 - lam) * spread(same[partner])  # row i over caption rows
    caption_targets = lam * spread(same.T) + (1 - lam) * spread(same[partner].T)  # row j over images
    batch = 0.5 * (-(image_targets * logits.log_softmax(1)).sum(1).mean()
                   - (caption_targets * logits.T.log_softmax(1)).sum(1).mean())
    bank_targets = (lam * train_module.soft_targets(trainer.train_examples, image_ids, trainer.device)
                    + (1 - lam) * train_module.soft_targets(trainer.train_examples, image_ids[partner], trainer.device))
    bank = -(bank_targets * (scale * features @ trainer.bank.T).log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(got, 0.5 * (batch + bank), rtol=1e-5, atol=1e-6)
    plain = trainer._loss(images, image_ids, caption_ids)
    assert not torch.isclose(got, plain)  # the partner's captions count


def test_a_mixup_run_resumes_to_the_same_weights(shapes_folder: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """mixup draws from the generator that checkpoints restore: a resumed run repeats its draws."""
    assert_resumes_to_the_same_weights(shapes_folder, tmp_path, monkeypatch, "mixup_alpha", 0.4, 0.0)


def assert_resumes_to_the_same_weights(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       setting: str, value: object, off: object) -> None:
    """A locked-text run with `setting=value`, interrupted after its 2nd checkpoint and resumed, ends
    on the uninterrupted run's weights, and those differ from a run with `setting=off`."""
    settings = {"epochs": 4, "lock_text": True, "checkpoint_every": 5, setting: value}
    reference = _trainer(data, _config(tmp_path / "reference", **settings))
    reference.run()
    plain = _trainer(data, _config(tmp_path / "plain", **{**settings, setting: off}))
    plain.run()
    _interrupted_locked_run(data, tmp_path / "run", monkeypatch, after_saves=2, **{setting: value})
    resumed = _trainer(data, _config(tmp_path / "run", **settings))
    resumed.run()
    want, got = reference.model.state_dict(), resumed.model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(want[k], plain.model.state_dict()[k]) for k in want)  # the setting did something


def test_split_seed_draws_the_held_out_split_alone(shapes_folder: Path, tmp_path: Path) -> None:
    """`split_seed` keeps one held-out split across runs of other seeds (their scores then compare);
    without it `seed` draws the split too. The run's own randomness still follows `seed`."""
    def held(**seeds) -> set[str]:
        trainer = _trainer(shapes_folder, _config(tmp_path / "run", epochs=1, **seeds))
        return set(trainer.held_examples.images)

    on_split_1 = held(seed=1)
    assert on_split_1 and held(seed=7, split_seed=1) == on_split_1
    assert held(seed=1, split_seed=7) == held(seed=7) != on_split_1
    assert train_module.held_out_seed(_config(tmp_path, seed=3)) == 3
    assert train_module.held_out_seed(_config(tmp_path, seed=3, split_seed=0)) == 0
    # the same initial weights and split, another `seed`: another batch order and augmentation, other weights
    def one_step(seed: int, name: str) -> dict[str, torch.Tensor]:
        # a directory of its own each time: a run into a used one would resume it, not train afresh
        trainer = _trainer(shapes_folder, _config(tmp_path / name, epochs=1, seed=seed, split_seed=1, max_steps=1))
        trainer.run()
        return {k: v.clone() for k, v in trainer.model.state_dict().items()}

    first, again, other = one_step(1, "first"), one_step(1, "again"), one_step(7, "other")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_a_run_from_before_a_setting_existed_resumes_with_its_default(
    shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose recorded recipe lacks a setting added since ran with that setting's default."""
    _interrupted_locked_run(shapes_folder, tmp_path / "run", monkeypatch, after_saves=1)
    path = train_module.checkpoint.latest_train_state(tmp_path / "run")
    state = torch.load(path, weights_only=False)
    del state["recipe"]["mixup_alpha"]
    torch.save(state, path)
    config = dict(epochs=4, lock_text=True, checkpoint_every=5)
    assert _trainer(shapes_folder, _config(tmp_path / "run", **config)).try_resume()
    with pytest.raises(ValueError, match=r"mixup_alpha 0.0 -> 0.4"):
        _trainer(shapes_folder, _config(tmp_path / "run", mixup_alpha=0.4, **config)).try_resume()


def test_trivial_augment_is_optional_and_fills_with_the_padding_colour() -> None:
    from PIL import Image
    from torchvision import transforms

    from models.train_data import train_transform

    preprocess = {"size": 32, "resize_mode": "longest", "fill_color": 255, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    plain = train_transform(preprocess, AugmentConfig())
    assert not any(isinstance(t, transforms.TrivialAugmentWide) for t in plain.transforms)
    strong = train_transform(preprocess, AugmentConfig(trivial_augment=True))
    (trivial,) = [t for t in strong.transforms if isinstance(t, transforms.TrivialAugmentWide)]
    assert trivial.fill == [255, 255, 255]  # rotated-in corners match the white padding, not black
    # It works on the PIL image, before the tensor conversion, and keeps the output shape.
    assert strong.transforms.index(trivial) < [type(t) for t in strong.transforms].index(transforms.ToTensor)
    torch.manual_seed(0)
    outputs = {tuple(strong(Image.new("RGB", (40, 20), (200, 30, 30))).shape) for _ in range(20)}
    assert outputs == {(3, 32, 32)}


def test_random_erasing_fills_one_rectangle_with_noise_after_normalising() -> None:
    """`random_erasing=P`: the last step, on the normalised tensor; off, the transform is the same
    as before the setting existed (the committed recipe's draws unchanged)."""
    from PIL import Image
    from torchvision import transforms

    from models.train_data import train_transform

    preprocess = {"size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    flat = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, color_jitter=0.0, grayscale=0.0)
    plain = train_transform(preprocess, flat)
    assert [type(t) for t in train_transform(preprocess, flat, 0.0).transforms] == [type(t) for t in plain.transforms]
    erasing = train_transform(preprocess, flat, 1.0)
    assert isinstance(erasing.transforms[-1], transforms.RandomErasing)
    image = Image.new("RGB", (32, 32), (255, 255, 255))  # normalises to 1.0 everywhere
    torch.manual_seed(0)
    for _ in range(10):
        out = erasing(image)
        changed = (out != 1.0).any(dim=0)
        rows, cols = changed.nonzero(as_tuple=True)
        area = int(changed.sum())
        box = (int(rows.max() - rows.min()) + 1) * (int(cols.max() - cols.min()) + 1)
        assert 0.015 * 32 * 32 <= area and area >= 0.95 * box  # one filled rectangle (noise may hit 1.0 rarely)
        assert box <= 0.33 * 32 * 32 + 32
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="random_erasing is a probability"):
            train_transform(preprocess, flat, bad)


def test_a_random_erasing_run_resumes_to_the_same_weights(shapes_folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Erasing draws from the RNG that checkpoints restore: a resumed run repeats its draws."""
    assert_resumes_to_the_same_weights(shapes_folder, tmp_path, monkeypatch, "random_erasing", 0.5, 0.0)


def test_a_bad_erasing_probability_is_refused_before_any_image_is_decoded(shapes_folder: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "decode_pairs", lambda *a, **k: pytest.fail("it decoded images"))
    with pytest.raises(ValueError, match="random_erasing is a probability"):
        _trainer(shapes_folder, _config(tmp_path / "run", random_erasing=2.0))


def test_caption_bank_targets_spread_evenly_over_distinct_captions() -> None:
    a, b = Path("/a.png"), Path("/b.png")
    # a repeated row (a, "x") must neither double "x" nor leave a's row summing to less than 1
    examples = Examples.from_pairs([Pair(a, "x"), Pair(a, "x"), Pair(a, "y"), Pair(b, "y")])
    targets = soft_targets(examples, torch.tensor([0, 1]), torch.device("cpu"))
    assert targets.tolist() == [[0.5, 0.5], [0.0, 1.0]]


def _convolutional_trainer_and_batch(
    shapes_folder: Path, tmp_path: Path, **overrides
) -> tuple[Trainer, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A trainer of the default architecture (timm resnet10t: every layer a convolution, a locked
    MiniLM), its caption bank embedded, in training mode, and one batch of 8 (images, image ids,
    caption ids)."""
    torch.manual_seed(0)
    loaded = create_model("clipsearch-minilm-cnn")
    config = _config(tmp_path / "run", batch_size=8, lock_text=True, **overrides)
    trainer = Trainer(loaded, open_clip.get_tokenizer(loaded.registered_name), read_pairs(shapes_folder), config)
    trainer.bank = embed_captions(trainer.model, trainer.tokenizer, trainer.train_examples.captions,
                                               trainer.device)
    items = [trainer.dataset[i] for i in range(8)]
    images = torch.stack([item[0] for item in items])
    image_ids, caption_ids = (torch.tensor([item[k] for item in items]) for k in (1, 2))
    set_train_mode(trainer.model, lock_text=True, lock_image=False)
    return trainer, (images, image_ids, caption_ids)


def test_channels_last_step_matches_the_plain_layout(shapes_folder: Path, tmp_path: Path) -> None:
    """The trainer runs a convolutional image tower in channels_last (faster on the CPU too): its
    loss and gradients equal those of a plain contiguous copy of the same model on the same batch."""
    import copy

    trainer, (images, image_ids, caption_ids) = _convolutional_trainer_and_batch(shapes_folder, tmp_path)
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in trainer.model.visual.parameters() if p.ndim == 4)
    reference = copy.deepcopy(trainer.model).to(memory_format=torch.contiguous_format)

    def loss_and_grads(images: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(1)  # the same dropout mask (the tower's head) in both runs
        loss = trainer._loss(images, image_ids, caption_ids)
        loss.backward()
        return float(loss.detach()), {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    fast_loss, fast = loss_and_grads(images.contiguous(memory_format=torch.channels_last))
    trainer.model = reference
    plain_loss, plain = loss_and_grads(images.contiguous())
    assert fast.keys() == plain.keys() and any(name.startswith("visual.") for name in fast)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    # the layouts sum in other orders (oneDNN against torch's own kernels): compare each gradient as
    # a whole, not element by element
    worst = max(float((fast[n] - plain[n]).norm() / plain[n].norm().clamp(min=1e-12)) for n in fast)
    assert worst < 2e-3, worst  # seen: 3.5e-4 (a mistake in the layout gives order 1)


def test_trainer_refuses_an_unknown_precision_before_decoding(shapes_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        _trainer(shapes_folder, _config(tmp_path / "run", precision="fp16"))
    assert not (tmp_path / "run").exists()  # nothing decoded, nothing written


def test_bf16_step_on_the_cpu_tracks_the_float32_step(shapes_folder: Path, tmp_path: Path) -> None:
    """`precision="bf16"` runs the image tower in bf16 on the CPU (weights and optimizer stay
    float32), and its loss and gradients stay close to a float32 step of the same model and batch."""
    import copy

    # no clipping: the gradients compared below are the raw ones
    trainer, (images, image_ids, caption_ids) = _convolutional_trainer_and_batch(
        shapes_folder, tmp_path, precision="bf16", grad_clip=1e9)
    reference = copy.deepcopy(trainer.model)

    seen: list[torch.dtype] = []
    hook = trainer.model.visual.trunk.conv1.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    torch.manual_seed(1)  # the same dropout mask (the tower's head) in both steps
    bf16_loss = trainer._step(images, image_ids, caption_ids)
    hook.remove()
    assert seen and seen[0] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    bf16 = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    torch.manual_seed(1)
    trainer.model = reference
    loss = trainer._loss(images.contiguous(memory_format=torch.channels_last), image_ids, caption_ids)
    loss.backward()
    fp32 = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert bf16.keys() == fp32.keys() and any(name.startswith("visual.") for name in fp32)
    assert bf16_loss == pytest.approx(float(loss.detach()), rel=2e-2)
    # bf16 keeps 8 bits of mantissa: single small tensors (early batch-norm layers) differ by up to
    # 30 % at initialisation, so compare the gradient as one vector. A wrong layout or loss is order 1.
    fast = torch.cat([bf16[n].flatten() for n in fp32])
    plain = torch.cat([fp32[n].flatten() for n in fp32])
    difference = float((fast - plain).norm() / plain.norm())
    assert difference < 0.2, difference  # seen: 0.078 (cosine 0.997)


@pytest.mark.parametrize(("setting", "message"), [
    ({"epochs": 0}, "epochs must be at least 1, got 0"),
    ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ({"checkpoint_every": 0}, "checkpoint_every must be at least 1, got 0"),
    ({"max_steps": 0}, "max_steps must be at least 1, got 0"),
    ({"warmup_steps": -5}, "warmup_steps must not be negative, got -5"),
    ({"mixup_alpha": -1.0}, "mixup_alpha must not be negative, got -1.0"),
    ({"lr": 0.0}, "lr must be positive, got 0.0"),
    ({"grad_clip": -1.0}, "grad_clip must be positive, got -1.0"),
    ({"val_fraction": 1.0}, r"val_fraction \(the held-out share of images\) must lie in \[0, 1\), got 1.0"),
    ({"val_fraction": -0.2}, r"must lie in \[0, 1\), got -0.2"),
    ({"label_smoothing": 1.0}, r"label_smoothing must lie in \[0, 1\), got 1.0"),
    ({"lock_text": True, "lock_image": True}, "lock_text and lock_image together leave nothing to train"),
])
def test_settings_no_run_can_use_are_refused_when_the_config_is_built(tmp_path: Path, setting, message) -> None:
    """A zero batch or checkpoint interval, or a held-out share of 1, ended in a ZeroDivisionError
    traceback; a negative warmup or mixup passed unseen. Now each names its setting."""
    with pytest.raises(ValueError, match=message):
        _config(tmp_path / "run", **setting)


def test_a_split_that_leaves_nothing_to_train_on_is_a_clear_error(tmp_path: Path) -> None:
    data = make_shapes_folder(tmp_path / "data", per_class=1)  # 8 images: 0.99 holds out every one
    with pytest.raises(ValueError, match=r"no pairs left to train on: val_fraction 0.99 held out all 8 usable"):
        _trainer(data, _config(tmp_path / "run", val_fraction=0.99))
