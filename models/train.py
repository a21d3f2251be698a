"""Contrastive training of a dual encoder on image-caption pairs, resumable after `kill -9`.

Symmetric InfoNCE with CLIP's clamped learnable temperature, AdamW with warmup + cosine decay,
AMP on CUDA, gradient clipping, optional LiT-style locked towers, Recall@K on a held-out split
after every epoch, metrics as JSON, and atomic checkpoints every N steps. A locked text tower is
embedded once up front (the caption bank) instead of at every step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from models import checkpoint
from models.caption_bank import CONFIG_KEY as CAPTION_BANK_KEY
from models.caption_bank import CaptionBank
from models.config import TrainConfig
from models.data import Pair, PairSet, split_pairs
from models.distill import Teacher
from models.encoder import LoadedModel, resolve_device, state_digest
from models.folder_lock import ensure_not_busy, folder_lock
from models.leakage import copies_across_split, warn_copies
from models.loss import (
    caption_bank_loss,
    clip_loss,
    distillation_loss,
    semantic_smoothing,
)
from models.monitor import embed_captions, evaluate_pairs
from models.optim import amp_settings, create_optimizer, warmup_cosine
from models.preprocess import inference_transform
from models.towers import lock_towers, locked_state_keys, set_train_mode, text_parameter_names
from models.train_data import (
    Examples,
    PairDataset,
    ResumableSampler,
    cache_side,
    decode_pairs,
    train_transform,
)

logger = logging.getLogger(__name__)


# Settings a resumed run may change: where it writes, how often it saves, how it shows progress,
# where it runs. Any other difference would silently continue another recipe's run (a run
# directory of a 120-epoch recipe resumed as a 240-epoch one gets neither schedule).
_FREE_ON_RESUME = frozenset({"output_dir", "checkpoint_every", "keep_checkpoints", "num_workers", "device", "progress"})


def held_out_seed(config: TrainConfig) -> int:
    """The seed that draws the run's held-out split (`split_seed`, else `seed`)."""
    return config.seed if config.split_seed is None else config.split_seed


def recipe_of(config: TrainConfig) -> dict[str, str]:
    """The settings that decide what a run computes, as comparable strings (saved in checkpoints)."""
    return _comparable({k: repr(v) for k, v in sorted(asdict(config).items()) if k not in _FREE_ON_RESUME})


def _comparable(recipe: dict[str, str]) -> dict[str, str]:
    """`recipe` with the teacher recorded as present or not. Which teacher is checked by the digest
    of its weights (`Trainer.try_resume`), not by the path that named it: the same teacher named by
    a relative and by an absolute path, or a run directory moved to another machine, is one recipe."""
    if "teacher" in recipe and recipe["teacher"] != repr(None):
        return {**recipe, "teacher": "a model directory"}
    return recipe


def soft_targets(examples: Examples, image_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, N) targets over the caption bank: uniform over each image's own distinct captions."""
    targets = torch.zeros(len(image_ids), len(examples.captions), device=device)
    for row, image_id in enumerate(image_ids.tolist()):
        captions = examples.captions_of[image_id]
        targets[row, captions] = 1.0 / len(captions)
    return targets


Mixing = tuple[float, torch.Tensor]  # (lambda, (B,) partner of each row)


def draw_mixing(batch: int, alpha: float) -> Mixing | None:
    """mixup (Zhang et al. 2018): lambda ~ Beta(alpha, alpha) and a random partner for each image,
    from the global torch generator (so checkpoints restore the draws); None when `alpha` is 0."""
    if alpha <= 0:
        return None
    beta = torch.distributions.Beta(torch.tensor(alpha), torch.tensor(alpha))
    return float(beta.sample()), torch.randperm(batch)


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    metrics: list[dict[str, Any]]
    skipped: Counter[str]


@dataclass
class _Progress:
    """What a checkpoint must restore besides weights and optimizer state."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0


RUN_WRITER = "training run is writing this run folder"
# What a run folder holds: a run's files, and the recipe's second cycle, average and inner-split
# report; hidden names are locks and files being written, `.tmp`/`.old` a model folder's publish.
RUN_ENTRIES = frozenset({"checkpoints", "model", "metrics.json", "rejects.json", "restart", "average",
                         "inner-split.json"})


def _in_a_run_folder(name: str) -> bool:
    return name.startswith(".") or name.removesuffix(".tmp").removesuffix(".old") in RUN_ENTRIES


class Trainer:
    """One training run: owns the model, the data, the optimizer and the run directory."""

    def __init__(
        self,
        loaded: LoadedModel,
        tokenizer: Any,
        pair_set: PairSet,
        config: TrainConfig,
        preprocess_overrides: dict[str, Any] | None = None,
    ) -> None:
        # before any work: a second run into a folder a live run is writing is refused at once
        ensure_not_busy(config.output_dir, RUN_WRITER, reentrant=True)
        foreign = checkpoint.foreign_entries(config.output_dir, _in_a_run_folder)
        if foreign:  # a run adds checkpoints, a model and reports: never among a user's own files
            raise ValueError(f"{config.output_dir} holds other things than a training run ({foreign}): train "
                             "into a new or empty folder, or into an earlier run's folder to resume it")
        self.loaded = loaded
        self.tokenizer = tokenizer
        self.config = config
        self.device = resolve_device(config.device)
        # before the images are decoded: a bad precision fails at once, not after minutes of decoding
        self.amp_dtype, self.scaler = amp_settings(self.device, config.precision)
        # channels_last: a convolutional tower trains faster in it, on the CPU too (the default
        # recipe's epoch 15.1 -> 12.4 s on 2 cores)
        self.model: Any = loaded.model.to(self.device).to(memory_format=torch.channels_last)
        self.preprocess_config = {**loaded.preprocess_config, **(preprocess_overrides or {})}
        self.eval_preprocess = inference_transform(self.preprocess_config)
        self.teacher = self._load_teacher()  # also before the decoding: a teacher that cannot teach fails at once
        self._check_semantic_smoothing()
        # built before the decoding too, so that settings it refuses fail at once
        transform = train_transform(self.preprocess_config, config.augment, config.random_erasing)
        self._split_data(pair_set)
        lock_towers(self.model, config.lock_text, config.lock_image)
        text_names = set(text_parameter_names(self.model))
        self.text_frozen = not any(p.requires_grad for n, p in self.model.named_parameters() if n in text_names)
        if config.caption_bank is not None and not self.text_frozen:
            raise ValueError("a caption bank needs a locked text tower (lock_text / --lock-text): "
                             "its caption embeddings must not change after training")
        self.dataset = PairDataset(
            self.train_examples, self.train_cache, transform
        )
        self.batch_size = min(config.batch_size, len(self.dataset))
        self.steps_per_epoch = len(self.dataset) // self.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.optimizer = create_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(config.warmup_steps, self.total_steps)
        )
        self.metrics: list[dict[str, Any]] = []
        self.progress = _Progress()
        # Checkpoints leave the locked towers out (the default model's text tower is 90 MB of a
        # 150 MB checkpoint); a resumed run reloads them from their source and checks their digest.
        self.locked_keys = locked_state_keys(self.model, config.lock_text, config.lock_image)
        self._locked_digest: str | None = None
        self.bank: torch.Tensor | None = None  # (N, D) caption features when the text tower is frozen
        self.held_caption_features: np.ndarray | None = None  # the same for the held-out captions

    def _split_data(self, pair_set: PairSet) -> None:
        """Decode the images, split the usable pairs into training and held-out examples, and warn
        when a held-out image is a copy of a training one."""
        config = self.config
        pairs, cache, self.skipped = self._decode(pair_set)
        train_pairs, held_pairs = split_pairs(PairSet(pairs, pair_set.root), config.val_fraction,
                                              held_out_seed(config))
        if not train_pairs:
            raise ValueError(f"no pairs left to train on: val_fraction {config.val_fraction} held out all "
                             f"{len(held_pairs)} usable pairs; lower it")
        self.train_examples = Examples.from_pairs(train_pairs)
        self.held_examples = Examples.from_pairs(held_pairs)
        self.held_out_copies = copies_across_split(self.train_examples.images, self.held_examples.images)
        warn_copies(self.held_out_copies, len(self.held_examples.images))
        self.train_cache = [cache[p] for p in self.train_examples.images]
        self.held_cache = [cache[p] for p in self.held_examples.images]

    def _decode(self, pair_set: PairSet) -> tuple[list[Pair], dict[Path, Image.Image | None], Counter[str]]:
        """Decode every pair's image once (kept in memory when `cache_images`), skip and count the
        unreadable ones, and list them in the run directory's rejects.json."""
        config = self.config
        keep_side = cache_side(self.preprocess_config) if config.cache_images else None
        pairs, cache, skipped, rejects = decode_pairs(pair_set, keep_side, config.progress)
        if not pairs:
            raise ValueError(f"no usable image-caption pairs (skipped: {dict(skipped)})")
        config.output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(config.output_dir / "rejects.json", rejects)
        return pairs, cache, skipped

    def _check_semantic_smoothing(self) -> None:
        config = self.config
        if config.semantic_smoothing == 0:
            return
        if not 0.0 < config.semantic_smoothing <= 1.0:
            raise ValueError(f"semantic_smoothing must lie in [0, 1], got {config.semantic_smoothing}")
        if config.semantic_temperature <= 0:
            raise ValueError(f"semantic_temperature must be positive, got {config.semantic_temperature}")
        if not (config.lock_text and config.caption_bank_loss):
            raise ValueError("semantic smoothing reshapes the caption-bank loss's targets: it needs a locked text "
                             "tower (lock_text / --lock-text) and the caption-bank loss")

    def _load_teacher(self) -> Teacher | None:
        config = self.config
        if config.teacher is None:
            return None
        if not config.lock_text:
            raise ValueError("distillation teaches a distribution over the training captions' embeddings, "
                             "which needs a locked text tower (lock_text / --lock-text)")
        if not 0.0 <= config.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must lie in [0, 1], got {config.distill_weight}")
        if config.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be positive, got {config.distill_temperature}")
        return Teacher.load(config.teacher, self.model, self.preprocess_config, self.device)

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def locked_digest(self) -> str:
        """sha256 of the locked towers' tensors, computed once: they never change during a run."""
        if self._locked_digest is None:
            state = self.model.state_dict()
            self._locked_digest = state_digest({k: state[k] for k in self.locked_keys})
        return self._locked_digest

    def _state(self) -> dict[str, Any]:
        return {
            "model": {k: v for k, v in self.model.state_dict().items() if k not in self.locked_keys},
            "locked": {"tensors": len(self.locked_keys), "sha256": self.locked_digest},
            "teacher": None if self.teacher is None else self.teacher.digest,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": asdict(self.progress),
            "recipe": recipe_of(self.config),
            "metrics": self.metrics,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }

    def save_checkpoint(self) -> None:
        checkpoint.save_train_state(
            self.config.output_dir, self.progress.step, self._state(), self.config.keep_checkpoints
        )

    def try_resume(self) -> bool:
        path = checkpoint.latest_train_state(self.config.output_dir)
        if path is None:
            return False
        state = checkpoint.load_train_state(path)
        saved, wanted = state.get("recipe"), recipe_of(self.config)
        if saved is not None:  # a setting added since the run started ran at its default value
            saved = _comparable({**recipe_of(TrainConfig(output_dir=self.config.output_dir)), **saved})
        else:  # written before checkpoints recorded their settings
            logger.warning("%s records no training settings: resuming it unchecked; it continues with "
                           "the settings given now, which may not be the ones it started with", path)
        if saved is not None and saved != wanted:
            changes = ", ".join(
                f"{k} {saved.get(k)} -> {wanted.get(k)}" for k in sorted(saved.keys() | wanted.keys())
                if saved.get(k) != wanted.get(k)
            )
            raise ValueError(
                f"{self.config.output_dir} holds a run with other settings ({changes}); resume it with "
                "the settings it started with, or train into a new directory"
            )
        taught_by = state.get("teacher")
        if self.teacher is not None and taught_by is not None and taught_by != self.teacher.digest:
            raise ValueError(f"{path} was taught by other weights than {self.config.teacher} holds now; resume it "
                             "with the teacher it started with, or train into a new directory")
        self._load_model_state(path, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.progress = _Progress(**state["progress"])
        self.metrics = state["metrics"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        logger.info("resumed from %s (step %d, epoch %d)", path.name, self.progress.step, self.progress.epoch)
        return True

    def _load_model_state(self, path: Path, state: dict[str, Any]) -> None:
        """Restore the trained weights; the locked towers stay as loaded from their source, which
        must still hold the weights the run started with."""
        locked = state.get("locked")
        if locked is None:  # written before checkpoints left the locked towers out: every weight
            self.model.load_state_dict(state["model"])
            return
        if locked["sha256"] != self.locked_digest:
            raise ValueError(
                f"{path} was trained against other weights of its locked tower than the ones loaded now "
                "(was the package or checkpoint it comes from replaced?); resume it with the weights it "
                "started with, or train into a new directory"
            )
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if set(missing) != self.locked_keys or unexpected:
            raise ValueError(f"{path} does not fit this model: missing {sorted(set(missing) - self.locked_keys)}, "
                             f"unexpected {sorted(unexpected)}")

    # -- the loop ----------------------------------------------------------------------------
    def _loss(self, images: torch.Tensor, image_ids: torch.Tensor, caption_ids: torch.Tensor,
              mixing: Mixing | None = None) -> torch.Tensor:
        """The contrastive loss of a batch. With `mixing` (the images were blended, see
        `draw_mixing`), each image's targets are its own captions by lambda and its partner's by
        1 - lambda: the loss is the same blend of the two pairings' losses, since both losses are
        linear in their targets. With a teacher, its distribution over the caption bank for the
        same (mixed) images weighs in by `distill_weight`."""
        image_features = F.normalize(self.model.encode_image(images).float(), dim=-1)  # (B, D)
        if self.bank is not None:
            text_features = self.bank[caption_ids.to(self.device)]
        else:
            captions = [self.train_examples.captions[i] for i in caption_ids.tolist()]
            tokens = self.tokenizer(captions).to(self.device)
            text_features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        # with no share in the loss (caption_bank_weight 0) the bank targets are not built either
        wanted = self.config.caption_bank_loss and self.config.caption_bank_weight > 0.0
        bank_targets = (soft_targets(self.train_examples, image_ids, self.device)
                        if self.bank is not None and wanted else None)  # (B, N)
        if bank_targets is not None and self.bank is not None and self.config.semantic_smoothing > 0:
            bank_targets = semantic_smoothing(bank_targets, self.bank, self.config.semantic_smoothing,
                                              self.config.semantic_temperature)
        loss = self._contrast(image_features, text_features, caption_ids, bank_targets)
        if mixing is not None:
            lam, partner = mixing
            on_device = partner.to(self.device)
            partner_loss = self._contrast(image_features, text_features[on_device], caption_ids[partner],
                                          None if bank_targets is None else bank_targets[on_device])
            loss = lam * loss + (1.0 - lam) * partner_loss
        if self.teacher is not None and self.bank is not None:
            weight = self.config.distill_weight
            taught = distillation_loss(image_features, self.teacher.features(images), self.bank,
                                       self.config.distill_temperature)
            loss = (1.0 - weight) * loss + weight * taught
        return loss

    def _contrast(self, image_features: torch.Tensor, text_features: torch.Tensor, caption_ids: torch.Tensor,
                  bank_targets: torch.Tensor | None) -> torch.Tensor:
        """Row i of the images against row i of the texts, and with `bank_targets` against every
        training caption too. A loss whose share is 0 is not computed at all."""
        logit_scale = self.model.logit_scale
        weight = self.config.caption_bank_weight
        if bank_targets is None or self.bank is None or weight == 0.0:
            return clip_loss(image_features, text_features, logit_scale, self.config.label_smoothing, caption_ids)
        if weight == 1.0:
            return caption_bank_loss(image_features, self.bank, bank_targets, logit_scale)
        # in-batch first, then the bank: the order the committed model's graph was built in, so
        # that gradients accumulate in the same order and a run repeats it bit for bit
        loss = clip_loss(image_features, text_features, logit_scale, self.config.label_smoothing, caption_ids)
        return (1.0 - weight) * loss + weight * caption_bank_loss(image_features, self.bank, bank_targets,
                                                                  logit_scale)

    def _step(self, images: torch.Tensor, image_ids: torch.Tensor, caption_ids: torch.Tensor) -> float:
        images = images.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        mixing = draw_mixing(len(images), self.config.mixup_alpha)
        if mixing is not None:
            lam, partner = mixing
            images = lam * images + (1.0 - lam) * images[partner.to(self.device)]
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                    else contextlib.nullcontext())
        with autocast:
            loss = self._loss(images, image_ids, caption_ids, mixing)
        self.optimizer.zero_grad(set_to_none=True)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, self.config.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, self.config.grad_clip)
            self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def evaluate(self) -> dict[str, float]:
        if not self.held_examples.pairs:
            return {}
        if self.text_frozen and self.held_caption_features is None:
            # A locked text tower embeds the held-out captions the same way every epoch: for the
            # default model on 2 CPU cores that was 5.5 s of a 21 s epoch.
            self.held_caption_features = embed_captions(
                self.model, self.tokenizer, self.held_examples.captions, self.device
            ).cpu().numpy()
        return evaluate_pairs(
            self.model, self.tokenizer, self.eval_preprocess, self.held_examples, self.held_cache, self.device,
            caption_bank=self._caption_bank(), caption_features=self.held_caption_features,
        )

    def _caption_bank(self) -> CaptionBank | None:
        """The shipped caption bank: every training caption, embedded by the locked text tower."""
        if self.config.caption_bank is None or self.bank is None:
            return None
        return CaptionBank(self.bank, self.config.caption_bank)

    def _end_epoch(self, started: float) -> None:
        p = self.progress
        record: dict[str, Any] = {
            "epoch": p.epoch + 1,
            "step": p.step,
            "train_loss": p.loss_sum / max(1, p.loss_count),
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": float(self.model.logit_scale.detach().exp()),
            "seconds": round(time.time() - started, 1),
            **self.evaluate(),
        }
        self.metrics.append(record)
        logger.info("epoch %d: %s", p.epoch + 1, {k: round(v, 4) for k, v in record.items() if isinstance(v, float)})
        p.epoch += 1
        p.batch_in_epoch = 0
        p.loss_sum, p.loss_count = 0.0, 0

    def _write_metrics(self) -> None:
        checkpoint.write_json(
            self.config.output_dir / "metrics.json",
            {
                "epochs": self.metrics,
                "train_pairs": len(self.train_examples.pairs),
                "held_out_pairs": len(self.held_examples.pairs),
                # held-out images with a byte-identical training image: their recall is not a test
                "held_out_copies": [[str(held), str(train)] for held, train in self.held_out_copies],
                "skipped": dict(self.skipped),
                "config": json.loads(json.dumps(asdict(self.config), default=str)),
            },
        )

    def _seed(self) -> None:
        seed = self.config.seed
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def run(self) -> TrainResult:
        """Train to the end (resuming from the run folder's last checkpoint) and save the model. The
        run folder is locked meanwhile: a second trainer there would interleave its checkpoints."""
        with folder_lock(self.config.output_dir, RUN_WRITER, reentrant=True):
            return self._run()

    def _run(self) -> TrainResult:
        if not self.try_resume():
            self._seed()  # a fresh run; a resumed one restored the RNG states of its checkpoint
        self.bank = (
            embed_captions(self.model, self.tokenizer, self.train_examples.captions, self.device)
            if self.text_frozen
            else None
        )
        sampler = ResumableSampler(len(self.dataset), self.config.seed)
        p = self.progress
        while p.epoch < self.config.epochs and p.step < self.total_steps:
            started = time.time()
            sampler.epoch, sampler.skip = p.epoch, p.batch_in_epoch * self.batch_size
            set_train_mode(self.model, self.config.lock_text, self.config.lock_image)
            # The loader draws its worker base seed from its own generator, not the global RNG, so a
            # run resumed mid-epoch sees the same augmentation randomness as an uninterrupted one.
            loader = DataLoader(
                self.dataset, self.batch_size, sampler=sampler, drop_last=True,
                num_workers=self.config.num_workers,
                generator=torch.Generator().manual_seed(self.config.seed * 7919 + p.epoch),
            )
            bar = tqdm(
                loader, total=self.steps_per_epoch, initial=p.batch_in_epoch,
                desc=f"epoch {p.epoch + 1}/{self.config.epochs}", disable=not self.config.progress,
            )
            for images, image_ids, caption_ids in bar:
                loss = self._step(images, image_ids, caption_ids)
                p.step, p.batch_in_epoch = p.step + 1, p.batch_in_epoch + 1
                p.loss_sum, p.loss_count = p.loss_sum + loss, p.loss_count + 1
                bar.set_postfix(loss=f"{loss:.3f}")
                if p.step % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
                if p.step >= self.total_steps:
                    break
            if p.batch_in_epoch >= self.steps_per_epoch or p.step >= self.total_steps:
                self._end_epoch(started)
                self._write_metrics()
                self.save_checkpoint()
        return TrainResult(self.save_model(), p.step, self.metrics, self.skipped)

    def save_model(self) -> Path:
        meta: dict[str, Any] = {
            "architecture": self.loaded.architecture,
            "text_hub_id": self.loaded.text_hub_id,
            "trained_steps": self.progress.step,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        model_dir = self.config.output_dir / "model"
        caption_bank = self._caption_bank()
        if caption_bank is not None:  # before the config, whose presence means "complete"
            meta[CAPTION_BANK_KEY] = caption_bank.save(model_dir)
        return checkpoint.save_model_dir(
            model_dir,
            self.model,
            self.loaded.model_config,
            self.preprocess_config,
            meta,
        )
