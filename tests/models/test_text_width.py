"""Narrowed text towers (`models.text_width`) embed as the whole window does, and only where they can."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer

from models.encoder import DualEncoder
from models.text_width import agrees_with_whole_window, narrow_text_encoder, trim_padding

TOKENIZER = SimpleTokenizer(context_length=32)  # open_clip's own, as ViT-B-32 has (window 77)
VISION = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8}
TEXTS = ["a bird", "", "a piece of fruit on a wooden table", "🐦", "x " * 40, "a road sign", "  ",
         "a musical instrument in a dark room", "red"] * 5


def _text_cfg(**changes: Any) -> dict[str, Any]:
    return {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **changes}


def _build(custom_text: bool = False, **text_changes: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    kind = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return kind(embed_dim=24, vision_cfg=VISION, text_cfg=_text_cfg(**text_changes)).eval()


def _tokens(texts: list[str] = TEXTS) -> torch.Tensor:
    return TOKENIZER(texts)


def _widths_seen(model: torch.nn.Module) -> list[int]:
    """The column counts the text transformer runs over, recorded as the model runs."""
    transformer = model.text.transformer if isinstance(model, open_clip.CustomTextCLIP) else model.transformer
    widths: list[int] = []
    transformer.register_forward_pre_hook(lambda _module, args: widths.append(args[0].shape[1]))
    return widths


@pytest.mark.parametrize(
    ("custom_text", "changes"),
    [
        (False, {}),  # CLIP, pooled at the end-of-text token (argmax): ViT-B-32 and most published models
        (False, {"pool_type": "eos", "eos_id": 49407}),
        (False, {"pool_type": "first"}),
        (True, {}),  # CustomTextCLIP with open_clip's TextTransformer
        (True, {"pool_type": "eos", "eos_id": 49407, "proj_type": "linear"}),
    ],
)
def test_causal_towers_run_narrow_with_the_whole_windows_embeddings(custom_text: bool, changes: dict) -> None:
    model = _build(custom_text, **changes)
    narrow = narrow_text_encoder(model)
    assert narrow is not None
    tokens = _tokens()
    with torch.inference_mode():
        whole = model.encode_text(tokens)
        widths = _widths_seen(model)
        short = narrow(tokens[:3])  # "a bird", "", "a piece of fruit on a wooden table"
        got = narrow(tokens)
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    window = tokens.shape[1]
    assert widths[0] == (8 if changes.get("pool_type") == "first" else 16)  # the short texts: 9 columns, rounded up
    assert widths[1] == (8 if changes.get("pool_type") == "first" else window)  # "x " * 40 fills it
    torch.testing.assert_close(short, whole[:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("custom_text", "changes"),
    [
        (True, {"no_causal_mask": True, "pool_type": "last"}),  # bidirectional, read at the last column
        (True, {"no_causal_mask": True, "pool_type": "argmax"}),  # bidirectional: every column reaches each
        (True, {"embed_cls": True}),  # CoCa's class token, appended after the padding
        (False, {"pool_type": "last"}),
    ],
)
def test_towers_that_read_their_whole_window_are_not_narrowed(custom_text: bool, changes: dict) -> None:
    model = _build(custom_text, **changes)
    assert narrow_text_encoder(model) is None
    with torch.inference_mode():  # and they do read it: the padding changes a short text's embedding
        tokens = _tokens(["a bird"])
        whole, cut = model.encode_text(tokens), model.encode_text(torch.cat([tokens[:, :8], tokens[:, 8:] + 5], 1))
    assert not torch.allclose(whole, cut, atol=1e-4)


def test_trim_padding_keeps_every_column_a_text_uses_in_steps_of_eight() -> None:
    tokens = torch.zeros((2, 20), dtype=torch.long)
    tokens[0, :2], tokens[1, [0, 2]] = torch.tensor([5, 7]), torch.tensor([5, 9])
    assert trim_padding(tokens, 0).tolist() == tokens[:, :8].tolist()
    tokens[1, 11] = 4
    assert trim_padding(tokens, 0).shape == (2, 16)
    tokens[1, 19] = 4
    assert trim_padding(tokens, 0).shape == (2, 20)  # never wider than the window
    assert trim_padding(torch.zeros((2, 20), dtype=torch.long), 0).shape == (2, 8)


def test_a_tower_meets_few_widths_whatever_the_texts() -> None:
    """A server sees texts of every length; the tower runs over multiples of 8 columns only (each
    width costs per-shape state that stayed in the process: README)."""
    model = _build()
    widths = _widths_seen(model)
    narrow = narrow_text_encoder(model)
    assert narrow is not None
    words = ["a", "bird", "red", "fruit", "on", "the", "table"]
    with torch.inference_mode():
        for length in range(1, 40):
            narrow(_tokens([" ".join(words[i % 7] for i in range(length)), "a"]))
    assert set(widths) == {8, 16, 24, 32}


def _encoder(model: torch.nn.Module) -> DualEncoder:
    return DualEncoder(model, {"size": 32}, TOKENIZER, "test", torch.device("cpu"), text_batch_size=4)


def test_encode_texts_through_a_narrowed_tower_equals_the_whole_window_in_input_order() -> None:
    model = _build()
    with torch.inference_mode():
        reference = F.normalize(model.encode_text(_tokens()), dim=-1).numpy()
    encoder = _encoder(model)
    assert encoder._narrow_text is not None
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), reference, atol=1e-5)


def test_a_narrowed_path_that_disagrees_falls_back_to_the_whole_window(monkeypatch, caplog) -> None:
    """A tower built otherwise than `models.text_width` expects (a later open_clip, say) must not
    drift: the encoder checks the narrowed path on probe texts at load and, if it differs, warns and
    runs every text over the whole window."""
    model = _build()
    wrong = lambda tokens: model.encode_text(tokens) + 0.5  # noqa: E731
    monkeypatch.setattr("models.encoder.narrow_text_encoder", lambda _model: wrong)
    assert not agrees_with_whole_window(model, wrong, _tokens())
    with caplog.at_level(logging.WARNING, logger="models.encoder"):
        encoder = _encoder(model)
    assert encoder._narrow_text is None
    assert "disagrees with the whole-window" in caplog.text
    with torch.inference_mode():
        reference = F.normalize(model.encode_text(_tokens()), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), reference, atol=1e-6)
