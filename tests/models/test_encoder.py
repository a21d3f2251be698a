"""The embedding contract, loading from every source, and the model fingerprint."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from models import FingerprintMismatch, ModelFingerprint, load_encoder, resolve_device
from models.checkpoint import CONFIG_NAME, FULL_WEIGHTS_NAME, save_model_dir
from models.encoder import create_model

from ..conftest import TINY

TEXTS = ["a red circle", "a blue square", "", "x" * 2000, "a green circle", "yellow", "a yellow square"]


def test_contract_float32_unit_norm(tiny_encoder, sample_images) -> None:
    images = tiny_encoder.encode_images(sample_images)
    texts = tiny_encoder.encode_texts(TEXTS)
    for array, rows in ((images, len(sample_images)), (texts, len(TEXTS))):
        assert array.dtype == np.float32
        assert array.shape == (rows, tiny_encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(array, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_empty_array(tiny_encoder) -> None:
    assert tiny_encoder.encode_texts([]).shape == (0, tiny_encoder.dim)
    assert tiny_encoder.encode_images([]).shape == (0, tiny_encoder.dim)


def test_batched_equals_one_by_one(tiny_encoder, sample_images) -> None:
    # tiny_encoder batches 4 images / 3 texts at a time, so these calls cross batch borders
    batched_images = tiny_encoder.encode_images(sample_images)
    single_images = np.concatenate([tiny_encoder.encode_images([image]) for image in sample_images])
    np.testing.assert_allclose(batched_images, single_images, atol=1e-5)
    batched_texts = tiny_encoder.encode_texts(TEXTS)
    single_texts = np.concatenate([tiny_encoder.encode_texts([text]) for text in TEXTS])
    np.testing.assert_allclose(batched_texts, single_texts, atol=1e-5)


def test_preprocess_and_tokenizer_exposed(tiny_encoder, sample_images) -> None:
    pixels = torch.stack([tiny_encoder.preprocess(image) for image in sample_images])
    assert pixels.shape[1:] == (3, *tiny_encoder.image_size)
    np.testing.assert_allclose(
        tiny_encoder.encode_image_tensors(pixels), tiny_encoder.encode_images(sample_images), atol=1e-6
    )
    assert tiny_encoder.tokenizer(["hello"]).shape == (1, 16)


def _save_dir(encoder, path: Path) -> Path:
    loaded = create_model(TINY)
    loaded.model.load_state_dict(encoder.model.state_dict())
    return save_model_dir(path, loaded.model, loaded.model_config, loaded.preprocess_config,
                          {"architecture": TINY})


def test_model_dir_roundtrip_identical(tiny_encoder, sample_images, tmp_path: Path) -> None:
    model_dir = _save_dir(tiny_encoder, tmp_path / "model")
    assert (model_dir / CONFIG_NAME).is_file() and (model_dir / FULL_WEIGHTS_NAME).is_file()
    # same batch sizes as tiny_encoder: identical arithmetic, so bit-identical output
    again = load_encoder(model_dir, device="cpu", image_batch_size=4, text_batch_size=3)
    np.testing.assert_array_equal(again.encode_images(sample_images), tiny_encoder.encode_images(sample_images))
    np.testing.assert_array_equal(again.encode_texts(TEXTS), tiny_encoder.encode_texts(TEXTS))
    assert again.fingerprint.weights_sha256 == tiny_encoder.fingerprint.weights_sha256


def test_model_dir_loads_with_open_clip_itself(tiny_encoder, sample_images, tmp_path: Path) -> None:
    model_dir = _save_dir(tiny_encoder, tmp_path / "model")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    with torch.inference_mode():
        pixels = torch.stack([preprocess(image) for image in sample_images])
        features = model.encode_image(pixels, normalize=True).numpy()
    np.testing.assert_allclose(features, tiny_encoder.encode_images(sample_images), atol=1e-5)


def test_architecture_with_local_checkpoint_file(tiny_encoder, sample_images, tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    torch.save({"state_dict": tiny_encoder.model.state_dict()}, checkpoint)
    again = load_encoder(TINY, pretrained=str(checkpoint), device="cpu")
    np.testing.assert_allclose(again.encode_images(sample_images), tiny_encoder.encode_images(sample_images),
                               atol=1e-6)
    assert again.fingerprint.weights_sha256 == tiny_encoder.fingerprint.weights_sha256


def test_checkpoint_files_that_do_not_load_say_why_in_one_line(tiny_encoder, tmp_path: Path) -> None:
    """A corrupt file ended in torch's UnpicklingError traceback (whose advice, weights_only=False,
    would run the file's code); another model's weights listed every missing key."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=r"garbage.pt cannot be loaded as weights of clipsearch-tiny: not a file "
                                         r"of plain weights \(corrupt, or a pickle of more than tensors"):
        load_encoder(TINY, pretrained=str(garbage), device="cpu")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"some.other.weight": torch.zeros(2)}}, other)
    total = len(tiny_encoder.model.state_dict())
    with pytest.raises(ValueError, match=rf"other.pt cannot be loaded as weights of clipsearch-tiny: {total} "
                                         r"tensors of the architecture missing from it, 1 in it that"):
        load_encoder(TINY, pretrained=str(other), device="cpu")


def test_unknown_sources_raise_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match="unknown architecture"):
        load_encoder("no-such-architecture", device="cpu")
    with pytest.raises(FileNotFoundError, match=f"checkpoint file {tmp_path}/missing.pt not found"):
        load_encoder(TINY, pretrained=str(tmp_path / "missing.pt"), device="cpu")
    with pytest.raises(FileNotFoundError, match="checkpoint file missing.safetensors not found"):
        load_encoder("ViT-B-32", pretrained="missing.safetensors", device="cpu")
    with pytest.raises(FileNotFoundError, match="model directory .*missing-model not found"):
        load_encoder(str(tmp_path / "missing-model"), device="cpu")
    with pytest.raises(FileNotFoundError, match="is not a model directory: it has no open_clip_config.json"):
        load_encoder(str(tmp_path), device="cpu")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"model directory {tmp_path}/elsewhere not found"):
        load_encoder("~/elsewhere", device="cpu")  # "~" expanded, as a shell would
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="pass a checkpoint file as `pretrained`"):
        load_encoder(str(tmp_path / "weights.pt"), device="cpu")


def test_a_pretrained_tag_with_the_hub_off_says_how_to_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """clipsearch keeps the hub off unless asked (HF_HUB_OFFLINE=1 by default), so a user online
    asking for published weights got open_clip's "check your connection", twice, with no word that
    the hub was off on purpose nor how to turn it on."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    with pytest.raises(RuntimeError, match=r"the ViT-B-32 weights 'laion2b_s34b_b79k' are not in the local model "
                                           r"cache, and the model hub is off .* run with HF_HUB_OFFLINE=0"):
        load_encoder("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    with pytest.raises(RuntimeError, match=r"the weights of hf-hub:org/model are not in the local model cache, "
                                           r"and the model hub is off"):
        load_encoder("hf-hub:org/model", device="cpu")


def test_an_unknown_pretrained_tag_is_said_once_with_the_tags(caplog: pytest.LogCaptureFixture) -> None:
    """open_clip logged its own error with every tag, then raised a second one: said twice."""
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError, match=r"pretrained 'nosuchtag' is neither a file nor a published tag of "
                                         r"ViT-B-32 \(its tags: openai, laion400m_e31, .*\); give a tag or a "
                                         r"checkpoint file"):
        load_encoder("ViT-B-32", "nosuchtag", device="cpu")
    with pytest.raises(ValueError, match=f"open_clip publishes no weights for {TINY}"):
        load_encoder(TINY, "openai", device="cpu")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_fingerprint_identifies_weights(tiny_encoder) -> None:
    same = tiny_encoder.fingerprint
    same.ensure_matches(ModelFingerprint.from_dict(same.as_dict()))
    torch.manual_seed(123)
    other = load_encoder(TINY, device="cpu")  # same architecture and dim, other weights
    assert other.fingerprint.dim == same.dim and other.fingerprint.architecture == same.architecture
    with pytest.raises(FingerprintMismatch, match="made with model"):
        other.fingerprint.ensure_matches(same, "index")


def test_a_mismatch_with_pretrained_weights_names_the_flags_that_load_them(tiny_encoder, tmp_path: Path) -> None:
    """An index built with `--model ViT-B-32 --pretrained vit-b-32.pt`, served with `--model ViT-B-32`
    alone (random weights), was refused without a word on how to load the model it needs."""
    checkpoint = tmp_path / "weights.pt"
    torch.save({"state_dict": tiny_encoder.model.state_dict()}, checkpoint)
    built_with = load_encoder(TINY, pretrained=str(checkpoint), device="cpu").fingerprint
    assert built_with.architecture == f"{TINY}:weights.pt"
    torch.manual_seed(7)
    with pytest.raises(FingerprintMismatch, match=f"built with \\(--model {TINY} --pretrained weights.pt: that tag, "
                                                  "or the checkpoint file of that name\\)$"):
        load_encoder(TINY, device="cpu").fingerprint.ensure_matches(built_with, "index")
    assert ModelFingerprint(TINY, "0" * 64, 32).loading_hint() == ""
    assert ModelFingerprint("hf-hub:org/model", "0" * 64, 32).loading_hint() == ""
    assert ModelFingerprint("local-dir:/models/m", "0" * 64, 32).loading_hint() == ""


def test_cuda_request_falls_back_to_cpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback is for machines without it")
    assert resolve_device("cuda").type == "cpu"
    assert resolve_device(None).type == "cpu"


@pytest.mark.gpu
def test_gpu_matches_cpu(tiny_encoder, sample_images) -> None:
    """Autocast + channels_last on CUDA agree with the float32 CPU path."""
    gpu = load_encoder(TINY, device="cuda")
    gpu.model.load_state_dict(tiny_encoder.model.state_dict())
    similarity = (gpu.encode_images(sample_images) * tiny_encoder.encode_images(sample_images)).sum(1)
    assert similarity.min() > 0.99
    similarity = (gpu.encode_texts(TEXTS) * tiny_encoder.encode_texts(TEXTS)).sum(1)
    assert similarity.min() > 0.99


def test_crop_fraction_in_a_model_dir(tiny_encoder, sample_images, tmp_path: Path) -> None:
    """A model folder may ask for a search-time centre crop: our encoder applies it, and it is part
    of the fingerprint, while open_clip itself still loads the folder (it ignores the key)."""
    loaded = create_model(TINY)
    loaded.model.load_state_dict(tiny_encoder.model.state_dict())
    config = {**loaded.preprocess_config, "crop_fraction": 0.8}
    model_dir = save_model_dir(tmp_path / "model", loaded.model, loaded.model_config, config, {"architecture": TINY})
    cropped = load_encoder(model_dir, device="cpu")
    assert cropped.preprocess_config["crop_fraction"] == 0.8
    size = tiny_encoder.image_size[0]
    enlarged = {**loaded.preprocess_config, "size": round(size / 0.8)}
    reference = load_encoder(save_model_dir(tmp_path / "larger", loaded.model, loaded.model_config, enlarged,
                                            {"architecture": TINY}), device="cpu")
    start = (round(size / 0.8) - size) // 2
    pixels = torch.stack([reference.preprocess(image)[:, start : start + size, start : start + size]
                          for image in sample_images])
    np.testing.assert_allclose(cropped.encode_images(sample_images), reference.encode_image_tensors(pixels),
                               atol=1e-6)
    assert not np.allclose(cropped.encode_images(sample_images), tiny_encoder.encode_images(sample_images))
    with pytest.raises(FingerprintMismatch):
        cropped.fingerprint.ensure_matches(tiny_encoder.fingerprint, "index")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    assert model.visual.preprocess_cfg["size"] in (size, (size, size), [size, size])


def test_a_device_torch_does_not_know_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu': use cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_a_gpu_the_machine_lacks_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """"cuda:3" on a one-GPU machine failed at the first model call, deep inside torch."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="'cuda:3' asked for, but this machine has 1 CUDA device"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_one_text_or_one_image_counts_as_a_list_of_one(tiny_encoder, sample_images) -> None:
    """encode_texts("a bird") embedded each of its six characters and returned six rows."""
    np.testing.assert_array_equal(tiny_encoder.encode_texts("a bird"), tiny_encoder.encode_texts(["a bird"]))
    assert tiny_encoder.encode_texts("a bird").shape == (1, tiny_encoder.dim)
    np.testing.assert_array_equal(tiny_encoder.encode_captions("a bird"), tiny_encoder.encode_captions(["a bird"]))
    np.testing.assert_array_equal(tiny_encoder.encode_images(sample_images[0]),
                                  tiny_encoder.encode_images(sample_images[:1]))


def test_what_is_not_a_text_or_an_image_is_refused_by_name(tiny_encoder, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="encode_texts takes strings, got int"):
        tiny_encoder.encode_texts(["a bird", 7])
    path = tmp_path / "bird.png"
    Image.new("RGB", (8, 8)).save(path)
    for item in (str(path), path, path.read_bytes()):
        with pytest.raises(TypeError, match=r"encode_images takes PIL images, got \w+; decode files with "
                                            r"models.load_image\(path\)"):
            tiny_encoder.encode_images([item])


def test_pretrained_with_a_model_that_brings_its_own_weights_is_refused(tmp_path: Path) -> None:
    """load_encoder("default", "weights.pt") loaded the default model and ignored the file unsaid."""
    with pytest.raises(ValueError, match=r"pretrained \(weights.pt\) goes with an open_clip architecture name; "
                                         r"default brings its own weights"):
        load_encoder("default", "weights.pt", device="cpu")
    with pytest.raises(ValueError, match="local-dir:/m brings its own weights"):
        load_encoder("local-dir:/m", "openai", device="cpu")
