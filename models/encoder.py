"""The dual encoder: PIL images and strings in, float32 L2-normalised `(n, d)` numpy arrays out.

`load_encoder` accepts the embedded default model, a project model directory, an open_clip
architecture with a pretrained tag or a local checkpoint file, or open_clip's `local-dir:` /
`hf-hub:` names. Preprocessing runs on the CPU; the model runs on CUDA when present (autocast)
and on the CPU otherwise (float32, or bf16 autocast on request: `models.precision`), in
channels_last on both. A model directory's caption bank, when it has
one, is applied to every image embedding (see `models.caption_bank`); its image bank to every
caption embedded for image -> text search (`encode_captions`, see `models.image_bank`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from models import checkpoint, registry
from models.caption_bank import CaptionBank
from models.image_bank import ImageBank
from models.images import normalize_image
from models.load_noise import quiet_model_build
from models.precision import autocast_dtype
from models.preprocess import inference_transform, preprocess_digest
from models.text_width import agrees_with_whole_window, narrow_text_encoder

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of a model's embedding space. Two encoders with equal fingerprints embed alike."""

    architecture: str
    weights_sha256: str
    dim: int

    def __str__(self) -> str:
        return f"{self.architecture}/{self.weights_sha256[:16]}/{self.dim}"

    def as_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "weights_sha256": self.weights_sha256, "dim": self.dim}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFingerprint:
        return cls(str(data["architecture"]), str(data["weights_sha256"]), int(data["dim"]))

    def ensure_matches(self, recorded: ModelFingerprint, what: str = "artefact") -> None:
        """Raise `FingerprintMismatch` unless `recorded` (from an index, say) names this model.

        The weights digest decides: two models of the same architecture and dimension but other
        weights embed into different spaces, and a dimension check alone would let them pass.
        """
        if recorded != self:
            raise FingerprintMismatch(
                f"{what} was made with model {recorded}, but the loaded model is {self}; "
                f"rebuild it with this model or load the model it was built with{recorded.loading_hint()}"
            )

    def loading_hint(self) -> str:
        """For an architecture loaded with pretrained weights ("ViT-B-32:vit-b-32.pt", as
        `create_model` names it), the flags that load it again; empty otherwise."""
        name, _, pretrained = self.architecture.partition(":")
        if not pretrained or name in ("local-dir", "hf-hub"):
            return ""
        return f" (--model {name} --pretrained {pretrained}: that tag, or the checkpoint file of that name)"


class FingerprintMismatch(ValueError):
    """An artefact (index, embeddings) was made by a different model than the one given."""


def is_text_side(name: str) -> bool:
    """A parameter or buffer of the text tower: everything but the image tower and the temperature."""
    return not name.startswith(("visual.", "logit_"))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict, in name order (independent of file format)."""
    return state_digest(model.state_dict())


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the named tensors, in name order, independent of their device and file format."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else tensor.dtype)
        digest.update(data.contiguous().numpy().tobytes())
    return digest.hexdigest()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA if available else CPU; a CUDA request without CUDA falls back to the CPU.
    Raises ValueError for a name torch does not know ("tpu") or a GPU this machine lacks ("cuda:3"
    on a one-GPU machine), which would otherwise fail at the first model call."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.warning("CUDA was requested but is not available; running on the CPU")
        return torch.device("cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} asked for, but this machine has {torch.cuda.device_count()} "
                         "CUDA device(s): cuda:0 is the first")
    return device


def _as_texts(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    items = list(texts)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"encode_texts takes strings, got {type(item).__name__}")
    return items


def _as_images(images: Sequence[Image.Image] | Image.Image) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        return [images]
    items = list(images)
    for item in items:
        if not isinstance(item, Image.Image):
            raise TypeError(f"encode_images takes PIL images, got {type(item).__name__}; decode files with "
                            "models.load_image(path), which refuses unsafe ones with a reason")
    return items


# Texts of several lengths, one over any window: the narrowed text path must embed them as the whole window does
_WIDTH_PROBE = ("a bird", "", "a piece of fruit on a wooden table in the kitchen, seen from above", "many words " * 60)


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class DualEncoder:
    """An open_clip model with its preprocess and tokenizer, ready to embed."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess_config: Mapping[str, Any],
        tokenizer: Callable[..., torch.Tensor],
        architecture: str,
        device: torch.device,
        image_batch_size: int = 64,
        text_batch_size: int = 256,
        caption_bank: CaptionBank | None = None,
        image_bank: ImageBank | None = None,
        precision: str = "auto",
    ) -> None:
        self.model: Any = model.eval()  # an open_clip CLIP / CustomTextCLIP
        self.preprocess_config = dict(preprocess_config)
        self.preprocess: Callable[[Image.Image], torch.Tensor] = inference_transform(preprocess_config)
        self.tokenizer = tokenizer
        self.device = device
        self.image_batch_size = image_batch_size
        self.text_batch_size = text_batch_size
        self._architecture = architecture
        self._fingerprint: ModelFingerprint | None = None
        self.autocast_dtype = autocast_dtype(device, precision)  # None: float32 (models.precision)
        # channels_last on every device: convolutional towers run faster in it on CUDA and on
        # the CPU (oneDNN) alike (README, Benchmarks); transformers have no 4-d weights to convert
        self.model = self.model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            probe = self.tokenizer(["probe"]).to(device)
            self.dim = int(self.model.encode_text(probe).shape[-1])
        self._narrow_text = self._checked_narrow_text()
        if caption_bank is not None and caption_bank.embeddings.shape[1] != self.dim:
            raise ValueError(f"the caption bank has {caption_bank.embeddings.shape[1]}-d embeddings, "
                             f"the model embeds into {self.dim} dimensions")
        self.caption_bank = caption_bank.to(device) if caption_bank is not None else None
        if image_bank is not None and caption_bank is None:
            # its rows were embedded through the caption bank: without it they are another space
            raise ValueError("an image bank needs its model's caption bank")
        self.image_bank = image_bank.to(device) if image_bank is not None else None

    def _checked_narrow_text(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The tower's narrowed text path (`models.text_width`) if it embeds probe texts as the
        whole window does; a tower built otherwise than expected falls back, with a warning."""
        narrow = narrow_text_encoder(self.model)
        if narrow is None:
            return None
        probe = self.tokenizer(list(_WIDTH_PROBE)).to(self.device)
        if agrees_with_whole_window(self.model, narrow, probe):
            return narrow
        logger.warning("%s: the narrowed text path disagrees with the whole-window one; every text "
                       "runs over the whole context window", self._architecture)
        return None

    @property
    def runs_as(self) -> str:
        """Where and in what precision the model runs, for logs: "cpu, float32", "cuda, bfloat16 autocast"."""
        dtype = str(self.autocast_dtype).removeprefix("torch.")
        return f"{self.device}, {'float32' if self.autocast_dtype is None else dtype + ' autocast'}"

    @property
    def fingerprint(self) -> ModelFingerprint:
        if self._fingerprint is None:  # hashing the weights takes a moment: only when asked
            digest = weights_digest(self.model)
            # the pixels the model sees shape the space as much as its weights do
            digest = hashlib.sha256(f"{digest}:{preprocess_digest(self.preprocess_config)}".encode()).hexdigest()
            if self.caption_bank is not None:  # the bank moves image embeddings: part of the space
                digest = hashlib.sha256(f"{digest}:{self.caption_bank.digest()}".encode()).hexdigest()
            if self.image_bank is not None:  # it moves the captions an image -> text index holds
                digest = hashlib.sha256(f"{digest}:{self.image_bank.digest()}".encode()).hexdigest()
            self._fingerprint = ModelFingerprint(self._architecture, digest, self.dim)
        return self._fingerprint

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.model.visual, "image_size", 224)
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def _run(self, encode: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> np.ndarray:
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            batch = batch.to(self.device, non_blocking=True)
            if batch.ndim == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
            features = encode(batch)
        return F.normalize(features.float(), dim=-1).cpu().numpy()

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(pixels)
        if self.caption_bank is None:
            return features
        # in float32 even under CUDA autocast: which captions are nearest must not depend on the device
        with torch.autocast(self.device.type, enabled=False):
            return self.caption_bank.project(features)

    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed already preprocessed images `(n, 3, H, W)` -> float32 `(n, d)`, unit norm."""
        out = np.empty((pixels.shape[0], self.dim), dtype=np.float32)
        for part in _batches(pixels.shape[0], self.image_batch_size):
            out[part] = self._run(self._image_features, pixels[part])
        return out

    def encode_images(self, images: Sequence[Image.Image] | Image.Image) -> np.ndarray:
        """Embed PIL images -> float32 `(n, d)`, unit norm. Each is seen as the indexer and the server
        see it (`models.images.normalize_image`: EXIF rotation, alpha on white); decode untrusted
        files with `models.load_image`. One image counts as a list of one. Raises TypeError for
        anything else, paths included."""
        images = [normalize_image(image) for image in _as_images(images)]
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for part in _batches(len(images), self.image_batch_size):
            pixels = torch.stack([self.preprocess(image) for image in images[part]])
            out[part] = self._run(self._image_features, pixels)
        return out

    def encode_texts(self, texts: Sequence[str] | str) -> np.ndarray:
        """Embed strings -> float32 `(n, d)`, unit norm. Over-long texts are truncated by the tokenizer.
        One string counts as a list of one (not as its characters: "a bird" gave six rows). These
        are queries (text -> image search); see `encode_captions` for the texts images look for."""
        texts = _as_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if self._narrow_text is None:  # a tower that reads its whole context window
            for part in _batches(len(texts), self.text_batch_size):
                out[part] = self._run(self.model.encode_text, self.tokenizer(list(texts[part])))
            return out
        # The tower runs each batch only as wide as its texts need (`models.text_width`: the
        # tokenizer pads "a bird" to the whole window), and texts go in order of length so that a
        # batch's texts are alike (512 short captions: 13x faster under MiniLM, 8x under ViT-B-32)
        order = np.argsort([len(text) for text in texts], kind="stable")
        for part in _batches(len(texts), self.text_batch_size):
            rows = order[part]
            out[rows] = self._run(self._narrow_text, self.tokenizer([texts[i] for i in rows]))
        return out

    def encode_captions(self, texts: Sequence[str] | str) -> np.ndarray:
        """Embed the captions or labels that images are to find (the documents of image -> text
        search, e.g. a caption index) -> float32 `(n, d)`, unit norm. With an image bank
        (`models.image_bank`) they are moved toward the training images of their nearest training
        captions; without one this equals `encode_texts`."""
        return self.as_captions(self.encode_texts(texts))

    def as_captions(self, text_embeddings: np.ndarray) -> np.ndarray:
        """The caption side of embeddings that `encode_texts` gave: the image bank's mixing, row
        by row (so a server can batch texts once and serve both sides); unchanged without a bank."""
        if self.image_bank is None or len(text_embeddings) == 0:
            return text_embeddings
        with torch.inference_mode():  # float32 on every device, as for the caption bank
            features = torch.from_numpy(np.ascontiguousarray(text_embeddings, dtype=np.float32)).to(self.device)
            return self.image_bank.project(features).cpu().numpy()


@dataclass
class LoadedModel:
    """A freshly built open_clip model and what is needed to save it again."""

    model: torch.nn.Module
    architecture: str
    registered_name: str
    model_config: dict[str, Any]
    preprocess_config: dict[str, Any]
    text_hub_id: str | None
    caption_bank: CaptionBank | None = None
    image_bank: ImageBank | None = None


def _preprocess_config(model: torch.nn.Module, overrides: dict[str, Any] | None) -> dict[str, Any]:
    config = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    config.update(overrides or {})
    return config


def load_model_dir(model_dir: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the model stored in a project model directory (full or partial weights)."""
    config, weights_path = checkpoint.read_model_dir(model_dir)
    meta = config.get("clipsearch", {})
    hub_id = meta.get("text_hub_id")
    model_config = registry.resolve_text_tower(config["model_cfg"], hub_id)
    name = registry.register_config(model_config)
    partial = weights_path.name != checkpoint.FULL_WEIGHTS_NAME
    with quiet_model_build(partial_load=partial):
        model = open_clip.create_model(
            name,
            pretrained=None if partial else str(weights_path),
            pretrained_text=partial,  # partial dirs take the frozen text tower from its own weights
            device="cpu",
        )
    if partial:
        state = checkpoint.load_weights(weights_path)
        reference = model.state_dict()
        state = {k: v.to(reference[k].dtype) if k in reference else v for k, v in state.items()}
        result = model.load_state_dict(state, strict=False)
        missing_trained = [k for k in result.missing_keys if not k.startswith("text.")]
        if result.unexpected_keys or missing_trained:
            raise ValueError(
                f"{weights_path} does not fit its config: unexpected {result.unexpected_keys[:5]}, "
                f"missing {missing_trained[:5]}"
            )
    model.to(device)
    caption_bank = CaptionBank.load(model_dir, meta)
    return LoadedModel(
        model=model,
        architecture=str(meta.get("architecture", name)),
        registered_name=name,
        model_config=model_config,
        preprocess_config=_preprocess_config(model, config.get("preprocess_cfg")),
        text_hub_id=hub_id,
        caption_bank=caption_bank,
        image_bank=ImageBank.load(model_dir, meta, caption_bank),
    )


def _refuse_paths_that_are_not_model_dirs(name: str, path: Path) -> None:
    """A path that names no model directory gets an error that says so, rather than "unknown
    architecture". Bare names stay architecture names even when a folder of that name exists;
    open_clip's own schemes contain slashes too and are left to open_clip."""
    if name.startswith(("local-dir:", "hf-hub:")):
        return
    if not ("/" in name or "\\" in name or name.startswith((".", "~"))):
        return
    if path.is_dir():
        raise FileNotFoundError(f"{path} is not a model directory: it has no {checkpoint.CONFIG_NAME}")
    if path.is_file():
        raise ValueError(f"{path} is a file: pass a checkpoint file as `pretrained`, with its architecture "
                         "as the model (load_encoder('ViT-B-32', 'file.pt'); --model ViT-B-32 --pretrained file.pt)")
    raise FileNotFoundError(f"model directory {path} not found")


def _create_open_clip(name: str, pretrained: str | None, device: torch.device | str) -> Any:
    """open_clip's model `name` with `pretrained` weights. A checkpoint file that torch cannot read
    (weights only: never arbitrary pickles) or that holds another architecture's weights raises
    ValueError in one line; open_clip's own errors were a traceback or a list of every missing key."""
    if pretrained is not None and not Path(pretrained).exists():
        if "/" in pretrained or Path(pretrained).suffix in CHECKPOINT_SUFFIXES:
            raise FileNotFoundError(f"checkpoint file {pretrained} not found")
        if name in open_clip.list_models():  # (an unknown name: open_clip's own error says so)
            _ensure_known_tag(name, pretrained)
    try:
        with quiet_model_build():
            return open_clip.create_model(name, pretrained=pretrained, device=device)
    except Exception as exc:  # noqa: BLE001 - re-raised unless a local file or the offline hub is to blame
        if pretrained is not None and Path(pretrained).is_file():
            raise ValueError(f"{pretrained} cannot be loaded as weights of {name}: {_load_failure(exc)}") from None
        if str(exc).startswith(("Failed to download weights", "Failed initial config/weights load")) and hub_offline():
            weights = f"the {name} weights {pretrained!r}" if pretrained else f"the weights of {name}"
            raise WeightsNotCached(
                f"{weights} are not in the local model cache, and the model hub is off (HF_HUB_OFFLINE=1, "
                "clipsearch's default: nothing is downloaded unasked). To download them, run with HF_HUB_OFFLINE=0; "
                "or give a local checkpoint file or model directory instead") from None
        raise


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _ensure_known_tag(name: str, tag: str) -> None:
    """Refuse a `tag` that is neither a file nor one of `name`'s published tags, in one line (open_clip
    logs its own error with every tag, then raises a second one: the same thing said twice)."""
    tags = open_clip.list_pretrained_tags_by_model(name)
    clean = tag.lower().replace("-", "_")
    if any(clean == known.lower().replace("-", "_") for known in tags):
        return
    offer = (f"its tags: {', '.join(tags)}" if tags else f"open_clip publishes no weights for {name}")
    raise ValueError(f"pretrained {tag!r} is neither a file nor a published tag of {name} ({offer}); "
                     "give a tag or a checkpoint file")


class WeightsNotCached(RuntimeError):
    """Published weights asked for with the model hub off and not in the local cache."""


def hub_offline() -> bool:
    """Whether huggingface_hub is told to stay offline (clipsearch's CLI and Makefile default)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_failure(exc: BaseException) -> str:
    """What went wrong loading a checkpoint file, in a line."""
    text = str(exc)
    if "Missing key(s)" in text or "Unexpected key(s)" in text:
        headers = {"missing": "Missing key(s)", "unexpected": "Unexpected key(s)"}
        counts = {}
        for kind, header in headers.items():
            part = text.partition(header)[2]
            for other in headers.values():  # up to the other list, whichever order torch gives them in
                part = part.partition(other)[0]
            counts[kind] = len(re.findall(r'"[^"]+"', part))
        return (f"{counts['missing']} tensors of the architecture missing from it, {counts['unexpected']} "
                "in it that the architecture lacks (another architecture's checkpoint?)")
    if "size mismatch" in text:
        return "its tensors have other shapes than this architecture's (another model's checkpoint?)"
    if isinstance(exc, pickle.UnpicklingError):
        # torch's text goes on to suggest weights_only=False, which would run the file's code: never
        return "not a file of plain weights (corrupt, or a pickle of more than tensors, which is never loaded)"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


def create_model(
    model: str | Path = "default",
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
) -> LoadedModel:
    """Build a model from any supported source (see module docstring)."""
    given = str(model)
    if given == "default":
        model = DEFAULT_MODEL_DIR
    path = Path(model).expanduser()
    name = str(model)
    is_model_dir = path.is_dir() and (path / checkpoint.CONFIG_NAME).is_file()
    if pretrained is not None and (is_model_dir or name.startswith(("local-dir:", "hf-hub:"))):
        # it was ignored: the weights came from the directory while the caller believed otherwise
        raise ValueError(f"pretrained ({pretrained}) goes with an open_clip architecture name; {given} brings "
                         "its own weights")
    if is_model_dir:
        return load_model_dir(path, device)
    _refuse_paths_that_are_not_model_dirs(name, path)
    if name.startswith(("local-dir:", "hf-hub:")):
        built = _create_open_clip(name, None, device)
        model_config: dict[str, Any] = {}
        architecture = name
    else:
        model_config = registry.get_model_config(name)
        resolved = registry.resolve_text_tower(model_config)
        if resolved != model_config:  # the text tower's weights come from a local package
            name = registry.register_config(resolved)
        built = _create_open_clip(name, pretrained, device)
        architecture = str(model) if not pretrained else f"{model}:{Path(pretrained).name}"
        model_config = resolved
    return LoadedModel(
        model=built,
        architecture=architecture,
        registered_name=name,
        model_config=model_config,
        preprocess_config=_preprocess_config(built, None),
        text_hub_id=registry.text_tower_hub_id(model_config) if model_config else None,
    )


def load_encoder(
    model: str | Path = "default",
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    image_batch_size: int = 64,
    text_batch_size: int = 256,
    caption_bank: bool = True,
    image_bank: bool = True,
    precision: str = "auto",
) -> DualEncoder:
    """Load a model for inference. See the module docstring for what `model` may name.

    `caption_bank=False` leaves out a model directory's caption bank (see `models.caption_bank`):
    the image tower's raw embeddings, in another space (another fingerprint). Its image bank
    (`models.image_bank`), built through the caption bank, goes with it; `image_bank=False`
    leaves out the image bank alone (captions embedded as plain texts).

    `pretrained`: an open_clip pretrained tag (needs its hub online or cached) or a checkpoint
    file, for an architecture name. `precision` (`models.precision`): `auto` autocasts on CUDA
    only, `bf16` on the CPU too (faster on CPUs with native bf16), `fp32` nowhere. Raises FileNotFoundError / KeyError / RuntimeError for a
    model that cannot be found.
    """
    target = resolve_device(device)
    loaded = create_model(model, pretrained, device=target)
    tokenizer = open_clip.get_tokenizer(loaded.registered_name)
    return DualEncoder(
        loaded.model,
        loaded.preprocess_config,
        tokenizer,
        loaded.architecture,
        target,
        image_batch_size=image_batch_size,
        text_batch_size=text_batch_size,
        caption_bank=loaded.caption_bank if caption_bank else None,
        image_bank=loaded.image_bank if caption_bank and image_bank else None,
        precision=precision,
    )
