"""Precision settings (`models.precision`) and the encoder under bf16 autocast on the CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from models import load_encoder
from models.precision import autocast_dtype
from tests.conftest import TINY

TEXTS = ["a red circle", "a blue square", "a yellow circle on a white ground", ""]


def test_auto_autocasts_on_cuda_only_and_fp32_nowhere() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "auto") is None
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, not 'fp16'"):
        autocast_dtype(cpu, "fp16")


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog) -> None:
    monkeypatch.setattr("models.precision.cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="models.precision"):
        assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert "no native bf16" in caplog.text


def test_bf16_on_the_cpu_embeds_close_to_float32_in_the_same_space(tiny_encoder, sample_images) -> None:
    """Weights stay float32: same fingerprint, embeddings within bf16 rounding of the float32 ones
    (and not equal to them: the autocast did run)."""
    torch.manual_seed(0)
    half = load_encoder(TINY, device="cpu", precision="bf16")
    half.model.load_state_dict(tiny_encoder.model.state_dict())
    half._fingerprint = None
    assert half.fingerprint == tiny_encoder.fingerprint
    assert (half.runs_as, tiny_encoder.runs_as) == ("cpu, bfloat16 autocast", "cpu, float32")
    for got, reference in ((half.encode_images(sample_images), tiny_encoder.encode_images(sample_images)),
                           (half.encode_texts(TEXTS), tiny_encoder.encode_texts(TEXTS))):
        assert got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert (got * reference).sum(axis=1).min() > 0.99
        assert not np.array_equal(got, reference)


@pytest.mark.gpu
def test_fp32_on_cuda_matches_the_cpu(tiny_encoder, sample_images) -> None:
    exact = load_encoder(TINY, device="cuda", precision="fp32")
    exact.model.load_state_dict(tiny_encoder.model.state_dict())
    np.testing.assert_allclose(exact.encode_images(sample_images), tiny_encoder.encode_images(sample_images),
                               atol=1e-4)
