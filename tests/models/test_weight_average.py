"""Averaging model directories: the tensor-wise mean, a loadable model, clear errors on a mismatch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models import load_encoder
from models.checkpoint import load_weights, read_model_dir, save_model_dir
from models.encoder import create_model
from models.weight_average import average_model_dirs

TINY = "clipsearch-tiny"


def _model_dir(path: Path, seed: int, architecture: str = TINY) -> Path:
    torch.manual_seed(seed)
    loaded = create_model(architecture)
    return save_model_dir(path, loaded.model, loaded.model_config, loaded.preprocess_config,
                          {"architecture": architecture})


def test_average_is_the_tensorwise_mean_and_loads(tmp_path: Path, sample_images) -> None:
    a, b = _model_dir(tmp_path / "a", seed=1), _model_dir(tmp_path / "b", seed=2)
    shutil.copytree(a, tmp_path / "avg")  # an earlier average: a model directory, replaced whole
    (tmp_path / "avg" / "stale.txt").write_text("from an earlier run")
    target = average_model_dirs([a, b], tmp_path / "avg")

    wa, wb = load_weights(read_model_dir(a)[1]), load_weights(read_model_dir(b)[1])
    mean = load_weights(read_model_dir(target)[1])
    assert mean.keys() == wa.keys()
    floats = [k for k in wa if wa[k].is_floating_point()]
    assert floats and any(not torch.equal(wa[k], wb[k]) for k in floats)
    for k in floats:  # the reference: a plain float64 mean per tensor
        expected = ((wa[k].double() + wb[k].double()) / 2).to(wa[k].dtype)
        assert mean[k].dtype == wa[k].dtype and torch.equal(mean[k], expected), k
    for k in set(wa) - set(floats):
        assert torch.equal(mean[k], wb[k])
    assert not (target / "stale.txt").exists()  # the target is replaced whole
    meta = read_model_dir(target)[0]["clipsearch"]
    assert [source["model"] for source in meta["averaged_from"]] == [str(a), str(b)]
    assert "trained_steps" not in meta  # the last source's alone would mislead

    encoder = load_encoder(str(target), device="cpu")
    images, texts = encoder.encode_images(sample_images), encoder.encode_texts(["a red square"])
    assert np.allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5) and texts.shape[0] == 1
    # a different model from either source: the fingerprint sees the new weights
    assert encoder.fingerprint != load_encoder(str(a), device="cpu").fingerprint


def test_average_of_a_model_with_itself_is_that_model(tmp_path: Path) -> None:
    a = _model_dir(tmp_path / "a", seed=3)
    target = average_model_dirs([a, a, a], tmp_path / "avg")
    wa, mean = load_weights(read_model_dir(a)[1]), load_weights(read_model_dir(target)[1])
    assert all(torch.equal(wa[k], mean[k]) for k in wa)


def test_mismatched_or_too_few_sources_are_refused(tmp_path: Path) -> None:
    a = _model_dir(tmp_path / "a", seed=1)
    with pytest.raises(ValueError, match="at least two"):
        average_model_dirs([a], tmp_path / "avg")

    loaded = create_model(TINY)
    wider = loaded.model_config | {"embed_dim": loaded.model_config["embed_dim"] * 2}
    b = save_model_dir(tmp_path / "b", loaded.model, wider, loaded.preprocess_config, {"architecture": TINY})
    with pytest.raises(ValueError, match="another architecture"):
        average_model_dirs([a, b], tmp_path / "avg")

    c = _model_dir(tmp_path / "c", seed=2)
    weights = read_model_dir(c)[1]
    state = load_weights(weights)
    state.pop(sorted(state)[0])
    save_file(state, str(weights))
    with pytest.raises(ValueError, match="other tensors"):
        average_model_dirs([a, c], tmp_path / "avg")

    with pytest.raises(FileNotFoundError):
        average_model_dirs([a, tmp_path / "missing"], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()  # nothing published by a refused average
