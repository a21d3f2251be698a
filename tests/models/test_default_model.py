"""The embedded default model: loads offline in one line, embeds, and answers everyday queries."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import DEFAULT_MODEL_DIR, load_encoder
from models.caption_bank import BANK_FILE
from models.checkpoint import CONFIG_NAME, FULL_WEIGHTS_NAME, PARTIAL_WEIGHTS_NAME
from models.image_bank import BANK_FILE as IMAGE_BANK_FILE

STAMPS = Path("/usr/share/tuxpaint/stamps")


@pytest.fixture(scope="module")
def default_encoder():
    return load_encoder()


def test_committed_checkpoint_is_small_and_partial() -> None:
    weights = DEFAULT_MODEL_DIR / PARTIAL_WEIGHTS_NAME
    assert (DEFAULT_MODEL_DIR / CONFIG_NAME).is_file() and weights.is_file()
    assert weights.stat().st_size < 25 * 1024 * 1024


def test_loads_and_embeds_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the default model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    encoder = load_encoder()
    text = encoder.encode_texts(["a bird"])
    image = encoder.encode_images([Image.new("RGB", (40, 30), (200, 30, 30))])
    assert text.shape == image.shape == (1, 384)
    assert encoder.fingerprint.architecture == "clipsearch-minilm-cnn"


def test_fingerprint_is_stable(default_encoder) -> None:
    assert load_encoder().fingerprint == default_encoder.fingerprint


def test_ships_a_caption_bank_that_moves_only_images(default_encoder) -> None:
    assert (DEFAULT_MODEL_DIR / BANK_FILE).stat().st_size < 5 * 1024 * 1024
    bank = default_encoder.caption_bank
    assert bank is not None and len(bank) > 1000 and bank.embeddings.shape[1] == default_encoder.dim
    raw = load_encoder(caption_bank=False)
    assert raw.fingerprint != default_encoder.fingerprint
    image = [Image.new("RGB", (40, 30), (200, 30, 30))]
    np.testing.assert_array_equal(raw.encode_texts(["a bird"]), default_encoder.encode_texts(["a bird"]))
    mixed, alone = default_encoder.encode_images(image), raw.encode_images(image)
    assert not np.allclose(mixed, alone)
    # the image embedding is the bank's mixing of what the image tower alone gives
    np.testing.assert_allclose(mixed, bank.project(torch.from_numpy(alone)).numpy(), atol=1e-5)


def test_ships_an_image_bank_that_moves_only_captions_as_documents(default_encoder) -> None:
    """The default model's captions for image -> text search pass through its image bank (the
    recipe's settings, one float16 row per caption-bank row); its text queries and images do not."""
    from models.default_model import IMAGE_BANK

    assert (DEFAULT_MODEL_DIR / IMAGE_BANK_FILE).stat().st_size < 5 * 1024 * 1024
    bank = default_encoder.image_bank
    assert bank is not None and bank.config == IMAGE_BANK and len(bank) == len(default_encoder.caption_bank)
    plain = load_encoder(image_bank=False)
    assert plain.fingerprint != default_encoder.fingerprint
    labels = ["a bird", "a piece of fruit"]
    image = [Image.new("RGB", (40, 30), (200, 30, 30))]
    np.testing.assert_array_equal(plain.encode_texts(labels), default_encoder.encode_texts(labels))
    np.testing.assert_array_equal(plain.encode_images(image), default_encoder.encode_images(image))
    np.testing.assert_allclose(default_encoder.encode_captions(labels),
                               bank.project(torch.from_numpy(plain.encode_texts(labels))).numpy(), atol=1e-5)



def test_channels_last_matches_the_plain_layout(default_encoder) -> None:
    """The encoder runs the convolutional tower in channels_last on the CPU too (it is faster there);
    a plain contiguous copy of the same weights, run by hand, is the reference."""
    import copy

    import torch.nn.functional as F

    visual = default_encoder.model.visual
    assert any(p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in visual.parameters())
    reference = copy.deepcopy(visual).to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in reference.parameters())
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(9, 3, *default_encoder.image_size, generator=generator)
    with torch.inference_mode():
        expected = default_encoder.caption_bank.project(reference(pixels))
    np.testing.assert_allclose(default_encoder.encode_image_tensors(pixels),
                               F.normalize(expected, dim=-1).numpy(), atol=1e-5)

def _gallery(encoder) -> tuple[list[Path], np.ndarray]:
    from models.images import load_image

    assert STAMPS.is_dir(), "the stamps gallery is missing: run `make install` (Debian tuxpaint-stamps-default)"
    paths = sorted(STAMPS.rglob("*.png"))
    return paths, encoder.encode_images([load_image(p) for p in paths])


@pytest.mark.slow
def test_everyday_queries_find_their_category(default_encoder) -> None:
    paths, embeddings = _gallery(default_encoder)
    queries = {"a bird": "birds", "a piece of fruit": "fruit", "a musical instrument": "music",
               "a road sign": "roadsigns", "a flower": "flowers", "a car": "vehicles"}
    scores = default_encoder.encode_texts(list(queries)) @ embeddings.T
    for row, (query, folder) in enumerate(queries.items()):
        top = [paths[i] for i in np.argsort(-scores[row])[:5]]
        hits = sum(folder in p.relative_to(STAMPS).parts for p in top)
        assert hits >= 3, (query, [str(p.relative_to(STAMPS)) for p in top])


def test_recipe_restarts_from_the_first_cycle(shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make model` trains a second cosine cycle that starts from the first cycle's weights (not
    from scratch), in a run directory of its own so that each cycle resumes on its own, and ships
    the average of the two cycles' weights. The precision asked for reaches both cycles."""
    import json
    from dataclasses import replace

    import models.default_model as recipe
    from models.checkpoint import load_weights, read_model_dir

    manifest = tmp_path / "pairs.jsonl"
    rows = [{"image": str(p), "caption": p.with_suffix(".txt").read_text().splitlines()[0]}
            for p in sorted(shapes_folder.rglob("*.png"))]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    full_recipe = recipe.default_train_config

    settings: dict[str, tuple[str, str]] = {}

    def tiny_recipe(run_dir: Path, epochs: int, progress: bool, precision: str = "auto", device: str = "cpu",
                    workers: int = 0):
        settings[run_dir.name] = (precision, full_recipe(run_dir, epochs, progress, precision, device).device or "")
        return replace(full_recipe(run_dir, epochs, progress, precision, device, workers), batch_size=16, max_steps=3)

    monkeypatch.setattr(recipe, "build_default_dataset", lambda data_dir: manifest)
    monkeypatch.setattr(recipe, "ARCHITECTURE", "clipsearch-tiny")
    monkeypatch.setattr(recipe, "default_train_config", tiny_recipe)
    # A learning rate too small to move a weight by more than ~1e-12: the second cycle must then end
    # where the first one did, which a restart from fresh weights (spread ~0.02) could not.
    monkeypatch.setattr(recipe, "RESTART_LR", 1e-12)

    torch.manual_seed(0)
    trained = recipe.train_default_model(tmp_path / "data", tmp_path / "run", epochs=1, restart_epochs=1,
                                         progress=False, precision="bf16")
    assert trained == tmp_path / "run" / "average"
    assert settings == {"run": ("bf16", "cpu"), "restart": ("bf16", "cpu")}  # both cycles, on the CPU by default
    restart_metrics = json.loads((tmp_path / "run" / "restart" / "metrics.json").read_text())
    assert restart_metrics["epochs"][-1]["step"] == 3  # it did train
    first = load_weights(read_model_dir(tmp_path / "run" / "model")[1])
    second = load_weights(read_model_dir(tmp_path / "run" / "restart" / "model")[1])
    averaged = load_weights(read_model_dir(trained)[1])
    learned = [k for k in first if k.startswith("visual.") and first[k].is_floating_point() and "running_" not in k]
    assert learned and all(torch.allclose(first[k], second[k], rtol=0, atol=1e-9) for k in learned)
    # the model is the average of the two cycles' ends
    assert all(torch.equal(averaged[k], ((first[k].double() + second[k].double()) / 2).to(first[k].dtype))
               for k in first if first[k].is_floating_point())

    # the model's image bank: built last, from the average's own weights and the recipe's training pairs
    _assert_image_bank_of(trained, recipe.recipe_training_pairs(tmp_path / "data"))

    skipped = recipe.train_default_model(tmp_path / "data", tmp_path / "run", epochs=1, restart_epochs=0,
                                         progress=False, precision="bf16")
    assert skipped == tmp_path / "run" / "model"
    _assert_image_bank_of(skipped, recipe.recipe_training_pairs(tmp_path / "data"))

    # for an export, which builds its own bank from the float16 weights, the average gets none
    bare = recipe.train_default_model(tmp_path / "data", tmp_path / "run", epochs=1, restart_epochs=1,
                                      progress=False, precision="bf16", image_bank=False)
    assert bare == trained and load_encoder(bare, device="cpu").image_bank is None


def _assert_image_bank_of(model_dir: Path, pairs) -> None:
    """`model_dir`'s image bank is the one its own weights give for these training pairs."""
    from models.default_model import IMAGE_BANK
    from models.image_bank import build_image_bank

    shipped = load_encoder(model_dir, device="cpu").image_bank
    assert shipped is not None and shipped.config == IMAGE_BANK
    rebuilt, _ = build_image_bank(load_encoder(model_dir, device="cpu", image_bank=False), pairs, IMAGE_BANK)
    torch.testing.assert_close(shipped.embeddings, rebuilt.embeddings)


def test_export_of_the_committed_model_gives_the_committed_model(default_encoder, tmp_path: Path) -> None:
    """`make model`'s last step: exporting (trained parts in float16, the caption bank, a portable
    text-tower name) is lossless on what it ships, and replaces an existing target whole."""
    from models.default_model import export_default_model

    target = tmp_path / "default"
    shutil.copytree(DEFAULT_MODEL_DIR, target)  # an older export: a model directory, replaced whole
    (target / "stale.txt").write_text("from an older export")
    assert export_default_model(DEFAULT_MODEL_DIR, target) == target
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default"]
    assert (target / PARTIAL_WEIGHTS_NAME).read_bytes() == (DEFAULT_MODEL_DIR / PARTIAL_WEIGHTS_NAME).read_bytes()
    assert (target / BANK_FILE).read_bytes() == (DEFAULT_MODEL_DIR / BANK_FILE).read_bytes()
    assert (target / IMAGE_BANK_FILE).read_bytes() == (DEFAULT_MODEL_DIR / IMAGE_BANK_FILE).read_bytes()
    exported = load_encoder(str(target))
    assert exported.fingerprint == default_encoder.fingerprint


def test_export_with_the_recipe_data_builds_its_image_bank_before_publishing(
        default_encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make model` exports with the recipe's data: the image bank is built from the exported
    (float16) folder while it is still staged, not copied from the trained one, so the published
    folder is never without it."""
    import models.default_model as recipe

    built: list[tuple] = []

    def attach(model_dir: Path, data_dir: Path, inner_split: int | None, device: str, progress: bool):
        assert not (tmp_path / "default").exists()  # not published yet
        assert not (model_dir / IMAGE_BANK_FILE).exists()  # the trained folder's bank was not copied
        weights = (model_dir / PARTIAL_WEIGHTS_NAME).read_bytes()
        assert weights == (DEFAULT_MODEL_DIR / PARTIAL_WEIGHTS_NAME).read_bytes()  # the float16 weights
        built.append((data_dir, inner_split, device, progress))
        default_encoder.image_bank.attach(model_dir)  # as attach_image_bank ends

    monkeypatch.setattr(recipe, "attach_image_bank", attach)
    target = recipe.export_default_model(DEFAULT_MODEL_DIR, tmp_path / "default", data_dir=tmp_path / "data",
                                         progress=False)
    assert built == [(tmp_path / "data", None, "cpu", False)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default"]
    assert (target / IMAGE_BANK_FILE).read_bytes() == (DEFAULT_MODEL_DIR / IMAGE_BANK_FILE).read_bytes()
    assert load_encoder(target, device="cpu").image_bank is not None


def _tiny_recipe(shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trainer: type) -> Path:
    """Point the recipe at the shapes folder (as its manifest), a tiny model, a few steps and `trainer`;
    returns the manifest."""
    import json
    from dataclasses import replace

    import models.default_model as recipe

    manifest = tmp_path / "pairs.jsonl"
    rows = [{"image": str(p), "caption": p.with_suffix(".txt").read_text().splitlines()[0]}
            for p in sorted(shapes_folder.rglob("*.png"))]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    full_recipe = recipe.default_train_config
    monkeypatch.setattr(recipe, "build_default_dataset", lambda data_dir: manifest)
    monkeypatch.setattr(recipe, "ARCHITECTURE", "clipsearch-tiny")
    monkeypatch.setattr(recipe, "Trainer", trainer)
    monkeypatch.setattr(recipe, "default_train_config",
                        lambda run_dir, epochs, progress, precision="auto", device="cpu", workers=0:
                        replace(full_recipe(run_dir, epochs, progress, precision, device), batch_size=16, max_steps=3))
    return manifest


def test_an_inner_split_never_sees_the_held_out_images(shapes_folder: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`clipsearch model --inner-split S`, the experiment protocol: both cycles train (and
    validate) on the recipe's training side alone, split by seed S, and the report scores the
    images that run held out, none of which the recipe's held-out set contains."""
    from dataclasses import replace

    import models.default_model as recipe
    from models.data import read_manifest
    from models.evaluate import held_out_only

    full_recipe = recipe.default_train_config
    seen: dict[str, tuple[set[Path], int, float, float]] = {}

    class RecordingTrainer(recipe.Trainer):
        def __init__(self, loaded, tokenizer, pair_set, config, preprocess) -> None:
            seen[config.output_dir.name] = ({p.image for p in pair_set.pairs}, config.seed, config.mixup_alpha,
                                              config.lr, config.augment)
            super().__init__(loaded, tokenizer, pair_set, config, preprocess)

    manifest = _tiny_recipe(shapes_folder, tmp_path, monkeypatch, RecordingTrainer)

    trained = recipe.train_default_model(tmp_path / "data", tmp_path / "run", epochs=1, restart_epochs=1,
                                         progress=False, inner_split=1, changes={"mixup_alpha": "0.3", "lr_scale": "0.5",
                                                                            "crop_scale_min": "0.8"})
    everything = read_manifest(manifest)
    held_out = {p.image for p in held_out_only(everything, recipe.HELD_OUT_FRACTION, seed=0).pairs}
    training_side = {p.image for p in recipe.training_side(everything).pairs}
    assert held_out and training_side and held_out.isdisjoint(training_side)
    assert training_side | held_out == {p.image for p in everything.pairs}
    # both cycles: seed 1, and the experiment's changes (lr_scale a factor on each cycle's own peak rate;
    # crop_scale_min the crops' smallest area, the rest of the augmentation the recipe's)
    first_lr, augment = full_recipe(tmp_path / "run", 1, False).lr, full_recipe(tmp_path / "run", 1, False).augment
    assert augment.scale != (0.8, 1.0)
    cropped = replace(augment, scale=(0.8, 1.0))
    assert seen == {"run": (training_side, 1, 0.3, first_lr * 0.5, cropped),
                    "restart": (training_side, 1, 0.3, recipe.RESTART_LR * 0.5, cropped)}

    # its image bank: from the inner run's own training pairs, none of which it holds out
    inner_pairs = recipe.recipe_training_pairs(tmp_path / "data", inner_split=1)
    assert {p.image for p in inner_pairs} < training_side
    _assert_image_bank_of(trained, inner_pairs)
    report = recipe.inner_split_report(trained, manifest, inner_split=1)
    inner = {p.image for p in held_out_only(recipe.training_side(everything), recipe.HELD_OUT_FRACTION, seed=1).pairs}
    assert inner and inner < training_side
    assert report.images == len(inner) and report.texts == len(inner)  # one caption per image here
    assert set(report.recall) >= {"text_to_image_R@10", "image_to_text_R@10"}
    with pytest.raises(ValueError, match="an inner split needs a seed of 1 or more, got 0"):
        recipe.train_default_model(tmp_path / "data", tmp_path / "other", inner_split=0)


def test_a_seed_change_draws_another_run_on_the_same_split(shapes_folder: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`--change seed=N`: both cycles run with seed N (initial weights, order, augmentation) and hold out
    what the inner split holds out, so runs of several seeds on one split compare."""
    import models.default_model as recipe

    seen: dict[str, tuple[int, int | None, set[Path], torch.Tensor]] = {}

    class RecordingTrainer(recipe.Trainer):
        def __init__(self, loaded, tokenizer, pair_set, config, preprocess) -> None:
            start = next(v for k, v in loaded.model.state_dict().items() if k.startswith("visual.")).clone()
            super().__init__(loaded, tokenizer, pair_set, config, preprocess)
            seen[config.output_dir.relative_to(tmp_path).as_posix()] = (
                config.seed, config.split_seed, set(self.held_examples.images), start)

    _tiny_recipe(shapes_folder, tmp_path, monkeypatch, RecordingTrainer)
    for name, changes in (("plain", {}), ("seeded", {"seed": "7"})):
        recipe.train_default_model(tmp_path / "data", tmp_path / name / "run", epochs=1, restart_epochs=1,
                                   progress=False, inner_split=1, changes=changes, image_bank=False)
    plain, plain_restart = seen["plain/run"], seen["plain/run/restart"]
    seeded, seeded_restart = seen["seeded/run"], seen["seeded/run/restart"]
    assert plain[:2] == plain_restart[:2] == (1, None)  # the recipe: the split's seed draws everything
    assert seeded[:2] == seeded_restart[:2] == (7, 1)
    assert plain[2] and seeded[2] == plain[2] == seeded_restart[2]  # the same images held out
    assert not torch.equal(seeded[3], plain[3])  # other initial weights


def test_recipe_changes_are_checked_and_typed() -> None:
    import models.default_model as recipe

    assert recipe.checked_changes({"weight_decay": "0.1", "batch_size": "128"}) == {"weight_decay": 0.1,
                                                                                     "batch_size": 128}
    assert recipe.checked_changes({"random_erasing": "0.25"}) == {"random_erasing": 0.25}
    assert recipe.checked_changes({"lr_scale": "0.5"}) == {"lr_scale": 0.5}
    assert recipe.checked_changes({"seed": "3"}) == {"seed": 3}
    assert recipe.checked_changes({"caption_bank_weight": "0.75"}) == {"caption_bank_weight": 0.75}
    with pytest.raises(ValueError, match="lr_scale must be positive, got 0.0"):
        recipe.checked_changes({"lr_scale": "0"})
    assert recipe.checked_changes({"crop_scale_min": "0.8"}) == {"crop_scale_min": 0.8}
    for bad in ("0", "1.5"):
        with pytest.raises(ValueError, match=r"crop_scale_min is a share of the image's area in \(0, 1\]"):
            recipe.checked_changes({"crop_scale_min": bad})
    with pytest.raises(ValueError, match="the recipe cannot change lr; it can change lr_scale, weight_decay"):
        recipe.checked_changes({"lr": "1"})
    with pytest.raises(ValueError, match="batch_size takes a whole number, not 'big'"):
        recipe.checked_changes({"batch_size": "big"})


def test_a_semantic_temperature_change_needs_semantic_smoothing() -> None:
    import models.default_model as recipe

    with pytest.raises(ValueError, match="semantic_temperature needs semantic smoothing"):
        recipe.checked_changes({"semantic_temperature": "0.07"})
    assert recipe.checked_changes({"semantic_smoothing": "1", "semantic_temperature": "0.07"}) == {
        "semantic_smoothing": 1.0, "semantic_temperature": 0.07}


def test_a_teacher_change_names_a_model_directory_and_the_distill_settings_need_one(tmp_path: Path) -> None:
    import models.default_model as recipe

    with pytest.raises(FileNotFoundError, match="is not a model directory"):
        recipe.checked_changes({"teacher": str(tmp_path)})
    with pytest.raises(ValueError, match="need a teacher"):
        recipe.checked_changes({"distill_weight": "0.3"})
    (tmp_path / CONFIG_NAME).write_text("{}")
    (tmp_path / FULL_WEIGHTS_NAME).write_bytes(b"")
    assert recipe.checked_changes({"teacher": str(tmp_path), "distill_weight": "0.3"}) == {
        "teacher": tmp_path, "distill_weight": 0.3}


def test_the_readmes_one_liner_runs_and_embeds_as_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "Embedding in one line" block, run as written on a transparent stamp: its image
    embedding is the one the server gives the same file."""
    from models import load_image

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Embedding in one line", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    bird = STAMPS / "animals" / "birds" / "adelaide-rosella.png"
    assert Image.open(bird).mode == "RGBA"  # transparent: the case the README's Image.open got wrong
    shutil.copy(bird, tmp_path / "bird.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    encoder = namespace["enc"]
    assert encoder.encode_texts(["a bird"]).shape == (1, 384)
    np.testing.assert_array_equal(encoder.encode_images([Image.open("bird.png")]),
                                  encoder.encode_images([load_image(bird)]))


def test_texts_run_only_as_wide_as_they_are_and_embed_as_with_the_whole_window(
        default_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MiniLM tower masks its own padding, so each batch drops the padding columns that every
    text in it has, and texts are batched by length; the embeddings are those of the whole
    64-token window in input order."""
    import torch.nn.functional as F

    texts = ["a bird", "", "🐦", "a piece of fruit on a wooden table in the kitchen", "x " * 200, "  ",
             "a road sign", "Ein Vogel sitzt auf dem Dach.", "a musical instrument"] * 40
    with torch.inference_mode():
        whole = default_encoder.model.encode_text(default_encoder.tokenizer(texts))
    reference = F.normalize(whole.float(), dim=-1).numpy()
    widths: list[int] = []
    encode_text = default_encoder.model.encode_text

    def spy(tokens: torch.Tensor) -> torch.Tensor:
        widths.append(tokens.shape[1])
        return encode_text(tokens)

    monkeypatch.setattr(default_encoder.model, "encode_text", spy)
    monkeypatch.setattr(default_encoder, "text_batch_size", 64)
    got = default_encoder.encode_texts(texts)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    window = default_encoder.tokenizer(["a"]).shape[1]
    assert len(widths) == 6 and widths == sorted(widths)  # 360 texts in 6 batches, shortest first
    assert widths[0] == 8 and widths[-1] == window  # only the batch holding the long text is whole
    assert all(width % 8 == 0 or width == window for width in widths)  # few distinct shapes


def test_hugging_face_towers_narrow_only_with_mean_or_first_token_pooling(default_encoder) -> None:
    """Mean and first-token pooling read no padded position; open_clip's max pooler does."""
    from open_clip.hf_model import ClsPooler, MaxPooler

    from models.text_width import narrow_text_encoder

    text = default_encoder.model.text
    assert narrow_text_encoder(default_encoder.model) is not None  # MiniLM, mean pooling
    mean = text.pooler
    try:
        text.pooler = ClsPooler()
        assert narrow_text_encoder(default_encoder.model) is not None
        text.pooler = MaxPooler()
        assert narrow_text_encoder(default_encoder.model) is None
    finally:
        text.pooler = mean
