"""The image bank: captions that images are to find, pulled toward the training images of the
training captions they resemble.

The caption bank (`models.caption_bank`) moves each image toward the text space. A caption that an
image is to find (a label in an image -> text index) stays where the text tower put it, and for
an object the image tower never saw, that spot can lie far from where the tower places its
pictures. The image bank makes the dual move: for each training caption (a row of the caption
bank, its key), the mean embedding of its training images as the model embeds any gallery image
(caption bank applied); a caption is blended with a softmax mixture of the rows of its nearest
training captions, nearest by the locked text tower.

It applies only to captions embedded as the documents of image -> text search
(`DualEncoder.encode_captions`), never to text queries: on inner splits of the default model's
training images it lifted image -> text Recall@1/5/10 on every model tried, while text queries
moved the same way lost text -> image recall on one split (README, experiment table).

Saved beside the caption bank (`trained/image_bank.safetensors`), its settings in the directory's
config; it needs the caption bank, whose rows are its keys, and works row by row.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

from models import checkpoint
from models.caption_bank import BANK_FILE as CAPTION_BANK_FILE
from models.caption_bank import CaptionBank, load_rows, mix_toward, rows_digest, save_rows
from models.config import ImageBankConfig
from models.data import Pair
from models.images import ImageRejected, load_image
from models.train_data import Examples

if TYPE_CHECKING:  # the encoder loads image banks: imported for the type only
    from models.encoder import DualEncoder

logger = logging.getLogger(__name__)

BANK_FILE = "trained/image_bank.safetensors"
CONFIG_KEY = "image_bank"  # its settings, in the `clipsearch` section of the model config
# A float16 caption bank (the committed model's) differs from freshly embedded captions by about
# 5e-4; captions of another data set differ by tenths.
ALIGNMENT_TOLERANCE = 5e-3
CHUNK = 256  # images decoded and embedded at a time while building


class ImageBank:
    """Unit-norm image rows `(N, D)`, one per caption-bank row, and the settings that mix them
    into caption embeddings."""

    def __init__(self, embeddings: torch.Tensor, keys: CaptionBank, config: ImageBankConfig,
                 normalized: bool = False) -> None:
        if embeddings.ndim != 2 or tuple(embeddings.shape) != tuple(keys.embeddings.shape):
            raise ValueError(f"an image bank needs one row per caption-bank row, shape "
                             f"{tuple(keys.embeddings.shape)}, got {tuple(embeddings.shape)}")
        self.embeddings = embeddings.float() if normalized else F.normalize(embeddings.float(), dim=-1)
        self.keys = keys
        self.config = config

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def to(self, device: torch.device | str) -> ImageBank:
        # the same bits on every device, as for the caption bank (its digest is in the fingerprint)
        return ImageBank(self.embeddings.to(device), self.keys.to(device), self.config, normalized=True)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm caption features `(B, D)` -> blended, unit-norm features `(B, D)`, row by row."""
        return mix_toward(features, self.keys.embeddings, self.embeddings, self.config)

    def digest(self) -> str:
        """sha256 of the rows and settings (the keys are the caption bank's, hashed with it)."""
        return rows_digest(self.embeddings, self.config)

    def save(self, model_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """Write the rows into `model_dir`; return the settings for the directory's config."""
        return save_rows(model_dir / BANK_FILE, self.embeddings, self.config, dtype)

    def attach(self, model_dir: Path) -> None:
        """Add this bank to an existing model directory (replacing one it had): the rows first, in
        the precision of the directory's caption bank (float16 in the committed model), then the
        config that names them, each written atomically."""
        with safe_open(str(model_dir / CAPTION_BANK_FILE), framework="pt") as rows:
            stored = rows.get_slice("embeddings")[:1].dtype  # one row read, not the whole bank
        settings = self.save(model_dir, dtype=stored)
        config, _ = checkpoint.read_model_dir(model_dir)
        config["clipsearch"][CONFIG_KEY] = settings
        checkpoint.write_json(model_dir / checkpoint.CONFIG_NAME, config)

    @classmethod
    def load(cls, model_dir: Path, meta: dict[str, Any], keys: CaptionBank | None) -> ImageBank | None:
        """The bank a model directory's config names, or None when it names none."""
        settings = meta.get(CONFIG_KEY)
        if not settings:
            return None
        if keys is None:
            raise ValueError(f"{model_dir} names an image bank but no caption bank: the caption bank's rows are "
                             "the image bank's keys")
        embeddings = load_rows(model_dir, BANK_FILE, settings, "an image bank")
        return cls(embeddings, keys, ImageBankConfig(**{k: v for k, v in settings.items() if k != "size"}))


def image_rows(image_features: torch.Tensor, captions_of: Sequence[Sequence[int]], n_captions: int) -> torch.Tensor:
    """Row c: the mean of the unit embeddings `(I, D)` of the images that carry caption c,
    renormalised. Every caption needs an image."""
    features = F.normalize(image_features.float(), dim=-1)
    owners = torch.tensor([i for i, captions in enumerate(captions_of) for _ in captions], dtype=torch.long)
    carried = torch.tensor([c for captions in captions_of for c in captions], dtype=torch.long)
    rows = torch.zeros(n_captions, features.shape[1]).index_add_(0, carried, features[owners])
    counts = torch.bincount(carried, minlength=n_captions)
    if bool((counts == 0).any()):
        missing = int((counts == 0).sum())
        raise ValueError(f"{missing} of {n_captions} captions have no readable image: an image bank needs one for each")
    return F.normalize(rows, dim=-1)


def build_image_bank(encoder: DualEncoder, pairs: Sequence[Pair], config: ImageBankConfig,
                     progress: bool = False) -> tuple[ImageBank, Counter[str]]:
    """The image bank of a model from the pairs it was trained on (the trainer's training side):
    their distinct captions must be the caption bank's rows, in its order. An unreadable image is
    skipped and counted, as in training (where it was skipped too)."""
    keys = encoder.caption_bank
    if keys is None:
        raise ValueError("an image bank needs a model with a caption bank: its rows are the bank's keys")
    skipped: Counter[str] = Counter()
    features: dict[Path, torch.Tensor] = {}
    paths = list(dict.fromkeys(p.image for p in pairs))
    with tqdm(total=len(paths), desc="image bank", disable=not progress) as bar:
        for start in range(0, len(paths), CHUNK):  # a chunk of decoded images in memory at a time
            chunk: list[tuple[Path, Image.Image]] = []
            for path in paths[start:start + CHUNK]:
                try:
                    chunk.append((path, load_image(path)))
                except ImageRejected as exc:
                    skipped["bad_image:" + exc.reason] += 1
            if chunk:
                embedded = torch.from_numpy(encoder.encode_images([image for _, image in chunk]))
                features.update(zip((path for path, _ in chunk), embedded, strict=True))
            bar.update(len(paths[start:start + CHUNK]))
    if skipped:
        logger.warning("image bank: %d unreadable images skipped: %s", sum(skipped.values()), dict(skipped))
    examples = Examples.from_pairs([p for p in pairs if p.image in features])
    if len(examples.captions) != len(keys):
        raise ValueError(f"these pairs hold {len(examples.captions)} distinct captions, the caption bank "
                         f"{len(keys)}: they are not the pairs the model was trained on")
    captions = torch.from_numpy(encoder.encode_texts(examples.captions))
    gap = float((captions - keys.embeddings.cpu()).abs().max())
    if gap > ALIGNMENT_TOLERANCE:
        raise ValueError(f"these pairs' captions are not the caption bank's rows in its order (largest difference "
                         f"{gap:.3g}): they are not the pairs the model was trained on")
    image_features = torch.stack([features[path] for path in examples.images])
    rows = image_rows(image_features, examples.captions_of, len(examples.captions))
    return ImageBank(rows, keys.to("cpu"), config, normalized=True), skipped
