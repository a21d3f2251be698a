"""Running a text tower only as wide as a batch's texts need, with the embeddings of the whole window.

open_clip's tokenizers pad every text to the tower's whole context window (77 tokens for "a bird"
under ViT-B-32, 64 under MiniLM), and the towers run every column: most of a query's compute is
padding. `narrow_text_encoder` returns, for the towers where this provably changes nothing, a
function that embeds full-window tokens by running only the columns that count:

- a Hugging Face tower with mean or first-token pooling builds its attention mask from the padding
  token and pools no padded position: the trailing columns that only pad go;
- open_clip's own text transformer under its causal mask, pooled at the end-of-text token
  (`argmax`, `eos`) or the first token: a position attends only to those before it, so the columns
  after every text's pooled position cannot reach the output and go, the positional embedding and
  the causal mask cut to match (open_clip slices neither when called with fewer columns).

Widths are rounded up to a multiple of `WIDTH_STEP` (the extra columns are padding, so the output
is the same): a server meets texts of every length, and a tower run over every width from 1 to 77
kept growing the process (oneDNN and the allocator keep per-shape state: 3,000 random batches of
the default model's texts grew it by 230 MB in float32 and 730 MB under bf16 autocast; in steps of
8, by 11 MB and 167 MB, flat from the 500th batch; README).

Other towers (max pooling, bidirectional transformers pooled at the last position, CoCa's appended
class token) read their whole window and get None. `agrees_with_whole_window` checks a narrowed
function against the tower itself, so a model built differently falls back rather than drifting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

TextEncode = Callable[[torch.Tensor], torch.Tensor]

# pooled at a position that depends on the text alone (not on the window's length)
_CAUSAL_POOLS = ("argmax", "eos", "first")
WIDTH_STEP = 8


def rounded_width(width: int, window: int) -> int:
    """`width` rounded up to a multiple of `WIDTH_STEP`, at most the whole `window`."""
    return min(window, -(-max(width, 1) // WIDTH_STEP) * WIDTH_STEP)


def narrow_text_encoder(model: Any) -> TextEncode | None:
    """A function tokens -> text features equal to `model.encode_text` that runs only the columns
    the batch's texts need; None when this tower must read its whole window."""
    hf_pad = _hf_padding_token(model)
    if hf_pad is not None:
        return lambda tokens: model.encode_text(trim_padding(tokens, hf_pad))
    text = getattr(model, "text", None)
    if text is None:  # open_clip's CLIP: the text tower's parts live on the model itself
        tower = _CausalTower.of(model, pool_type="text_pool_type", eos_id="text_eos_id")
    else:  # CustomTextCLIP with open_clip's TextTransformer
        from open_clip.transformer import TextTransformer

        tower = _CausalTower.of(text, pool_type="pool_type", eos_id="eos_id") if isinstance(text, TextTransformer) else None
    return tower.encode if tower is not None else None


def agrees_with_whole_window(model: Any, encode: TextEncode, tokens: torch.Tensor, atol: float = 1e-3) -> bool:
    """Whether `encode` gives `model.encode_text`'s unit-norm features for `tokens` (a probe of
    texts of several lengths, run in float32)."""
    with torch.inference_mode():
        whole = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
        narrow = torch.nn.functional.normalize(encode(tokens).float(), dim=-1)
    return whole.shape == narrow.shape and bool(torch.allclose(whole, narrow, atol=atol))


def trim_padding(tokens: torch.Tensor, pad: int) -> torch.Tensor:
    """`tokens` without the trailing columns that hold only `pad`, kept to a multiple of
    `WIDTH_STEP` columns (or the whole window)."""
    used = torch.ne(tokens, pad).any(dim=0).nonzero()
    return tokens[:, : rounded_width(int(used.max()) + 1 if len(used) else 1, tokens.shape[1])]


def _hf_padding_token(model: Any) -> int | None:
    """The padding token of a Hugging Face text tower pooled by mean or first token (its attention
    mask comes from that token, so padded columns change nothing); None for any other tower,
    open_clip's max pooler included (it reads padded positions)."""
    from open_clip.hf_model import ClsLastHiddenStatePooler, ClsPooler, HFTextEncoder, MeanPooler

    text = getattr(model, "text", None)
    pad = getattr(getattr(text, "config", None), "pad_token_id", None)
    if not isinstance(text, HFTextEncoder) or pad is None:
        return None
    return int(pad) if isinstance(text.pooler, MeanPooler | ClsPooler | ClsLastHiddenStatePooler) else None


class _CausalTower:
    """open_clip's text transformer forward, run over the first columns only."""

    def __init__(self, parts: Any, pool_type: str, eos_id: int) -> None:
        self.parts = parts
        self.pool_type = pool_type
        self.eos_id = eos_id

    @classmethod
    def of(cls, parts: Any, pool_type: str, eos_id: str) -> _CausalTower | None:
        pool = getattr(parts, pool_type, None)
        if (pool not in _CAUSAL_POOLS or getattr(parts, "attn_mask", None) is None
                or getattr(parts, "cls_emb", None) is not None):
            return None  # bidirectional, pooled at the last position, or CoCa's appended class token
        eos = getattr(parts, eos_id, None)
        if pool == "eos" and eos is None:
            return None
        return cls(parts, pool, int(eos) if eos is not None else -1)

    def pooled_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each text's pooled column (open_clip's `text_global_pool`; argmax takes the first maximum)."""
        if self.pool_type == "argmax":  # the end-of-text token has the highest id
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return torch.eq(tokens, self.eos_id).int().argmax(dim=-1)
        return torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        pooled = self.pooled_positions(tokens)  # all before `width`: the same in the cut tokens
        width = rounded_width(int(pooled.max()) + 1 if len(tokens) else 1, tokens.shape[1])
        tokens = tokens[:, :width]
        cast_dtype = parts.transformer.get_cast_dtype()
        x = parts.token_embedding(tokens).to(cast_dtype) + parts.positional_embedding[:width].to(cast_dtype)
        x = parts.ln_final(parts.transformer(x, attn_mask=parts.attn_mask[:width, :width]))
        x = x[torch.arange(x.shape[0], device=x.device), pooled]
        projection = parts.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
