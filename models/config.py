"""Frozen configuration records for the encoder and the trainer, built at the CLI edge and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from models.precision import PRECISIONS  # noqa: F401  (`TrainConfig.precision`, `clipsearch train --precision`)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time image augmentation (evaluation always uses the plain preprocess)."""

    scale: tuple[float, float] = (0.6, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 1.333)
    hflip: float = 0.5  # probability of a horizontal flip
    color_jitter: float = 0.2  # brightness/contrast/saturation strength; 0 disables
    grayscale: float = 0.05  # probability of converting to greyscale
    # TrivialAugment (one random op of random strength per image): a strong regulariser that pays
    # off only with long schedules.
    trivial_augment: bool = False


@dataclass(frozen=True)
class CaptionBankConfig:
    """How an image embedding is mixed with its nearest training captions."""

    # The defaults are the embedded default model's, chosen on an inner validation split.
    top_k: int = 50  # captions mixed per image
    temperature: float = 0.05  # softmax temperature over their cosine similarities
    blend: float = 0.4  # weight of the image's own embedding; the mixture gets 1 - blend
    label: ClassVar[str] = "caption bank"  # in error messages

    def __post_init__(self) -> None:
        what = self.label
        if self.top_k < 1:
            raise ValueError(f"{what} top_k must be at least 1, got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"{what} temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError(f"{what} blend must lie in [0, 1], got {self.blend}")


@dataclass(frozen=True)
class ImageBankConfig(CaptionBankConfig):
    """How a caption embedded for image -> text search is mixed with the training images of its
    nearest training captions (`models.image_bank`). The same three settings as the caption bank."""

    # The embedded default model's, chosen on inner split 1 and confirmed on split 2 (README).
    top_k: int = 20  # nearest training captions whose images are mixed
    blend: float = 0.5  # weight of the caption's own embedding
    label: ClassVar[str] = "image bank"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one contrastive training run needs besides the data and the starting model."""

    output_dir: Path
    epochs: int = 10
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    lock_text: bool = False
    lock_image: bool = False
    # Fraction of pairs held out for Recall@K each epoch; split by a hash of the image path.
    val_fraction: float = 0.1
    checkpoint_every: int = 200  # steps; a checkpoint is also written at the end of every epoch
    keep_checkpoints: int = 2
    seed: int = 0
    # The seed of the held-out split alone; None: `seed`, which then draws the split as well as the
    # run's randomness. Set it to train several seeds on one split (their scores then compare).
    split_seed: int | None = None
    num_workers: int = 0
    # Decode every image once and keep a small copy in memory: cheap epochs on small data sets.
    cache_images: bool = True
    # With a locked text tower, also contrast each image against every training caption, not
    # only the batch's (text features are precomputed once, so this costs one matmul).
    caption_bank_loss: bool = True
    # The caption-bank loss's share of the loss; the in-batch InfoNCE takes the rest. 0.5 (the
    # default recipe's): the two halves weigh alike.
    caption_bank_weight: float = 0.5
    label_smoothing: float = 0.0
    # mixup: blend each batch's images pairwise by lambda ~ Beta(alpha, alpha) and their targets
    # alike; 0 disables (the default recipe's setting)
    mixup_alpha: float = 0.0
    # Random erasing (Zhong et al. 2017; cutout): with this probability a training image gets one
    # random rectangle (2-33 % of it) filled with noise, after the other augmentations. A setting
    # of its own rather than of `augment`, so that checkpoints written before it still resume.
    # 0 disables (the default recipe's setting).
    random_erasing: float = 0.0
    # Semantic smoothing of the caption-bank targets (`models.loss.semantic_smoothing`): this share of
    # each image's target moves onto its captions' text neighbours, by a softmax of the text
    # similarities at `semantic_temperature`. 0: off (the default recipe's setting).
    semantic_smoothing: float = 0.0
    semantic_temperature: float = 0.05
    # Distillation: a trained model directory (same text tower and embedding space) whose image
    # tower teaches this one its distribution over the caption bank (`models.loss.distillation_loss`);
    # the loss is (1 - distill_weight) * the contrastive loss + distill_weight * that. None: off.
    teacher: Path | None = None
    distill_weight: float = 0.5
    distill_temperature: float = 0.05
    # With a locked text tower, ship the training captions' embeddings with the model and mix
    # each image embedding with its nearest captions (see `models.caption_bank`). None: off.
    caption_bank: CaptionBankConfig | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    device: str | None = None  # None: CUDA when available, else CPU
    # Mixed precision: "auto" is bf16 (fp16 with a grad scaler where bf16 is missing) on CUDA and
    # float32 on the CPU; "bf16" asks for bf16 autocast on the CPU too (about twice the speed of
    # a convolutional tower's step on a CPU with native bf16; see `models.optim.amp_settings`).
    precision: str = "auto"
    max_steps: int | None = None  # stop early (tests, smoke runs)
    progress: bool = True

    def __post_init__(self) -> None:
        """Refuse settings no run can use, before any image is decoded: a zero batch or
        checkpoint interval ended in a ZeroDivisionError, a negative warmup or mixup passed unseen."""
        at_least_one = {"epochs": self.epochs, "batch_size": self.batch_size,
                        "checkpoint_every": self.checkpoint_every, "keep_checkpoints": self.keep_checkpoints}
        if self.max_steps is not None:
            at_least_one["max_steps"] = self.max_steps
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, number in {"warmup_steps": self.warmup_steps, "num_workers": self.num_workers,
                             "weight_decay": self.weight_decay, "mixup_alpha": self.mixup_alpha}.items():
            if number < 0:
                raise ValueError(f"{name} must not be negative, got {number}")
        for name, number in {"lr": self.lr, "grad_clip": self.grad_clip}.items():
            if not number > 0:
                raise ValueError(f"{name} must be positive, got {number}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction (the held-out share of images) must lie in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.caption_bank_weight <= 1.0:
            raise ValueError(f"caption_bank_weight must lie in [0, 1], got {self.caption_bank_weight}")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise ValueError(f"the run directory {self.output_dir} is a file, not a folder")
        if self.lock_text and self.lock_image:
            raise ValueError("lock_text and lock_image together leave nothing to train but the temperature: "
                             "lock one tower at most")
