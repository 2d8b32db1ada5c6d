"""Real photos in training (`--photos DIR --photo-share S`): each batch takes S of its images from
the prepared photos of DIR/train/ (drawn by their own sampler, so a few thousand photos are seen
many times beside 55,000 dataset images), and the loss takes a set of right answers per image:
-log of the probability the model gives the classes a photo's label accepts (a long sleeve may
be a pullover or a shirt). For a dataset image the set is its one class, and the loss is the
usual cross-entropy, label smoothing included.

    fmnist train --preset photo --photos data/clothing
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fmnist import FmnistError
from fmnist.config import TrainConfig
from fmnist.data import BatchSampler, Normalization, to_tensor
from fmnist.data.photos import ACCEPTED, find_photos_dir
from fmnist.distributed import Dist
from fmnist.inference.forward import predict_logits
from fmnist.inference.photo_sets import PhotoSet, load_photo_set

SAMPLER_SEED = 7919  # added to --seed: the photos' batch order is its own stream


def set_loss(logits: torch.Tensor, accepted: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of -log P(a class in the accepted set), mixed with the uniform
    distribution's cross-entropy as torch's label smoothing is: for one-class sets this is
    F.cross_entropy(logits, labels, label_smoothing=...)."""
    log_p = logits.float().log_softmax(1)  # (B, classes)
    in_set = torch.logsumexp(log_p.masked_fill(~accepted, float("-inf")), 1)  # (B,)
    return ((label_smoothing - 1.0) * in_set - label_smoothing * log_p.mean(1)).mean()


def set_accuracy(logits: torch.Tensor, accepted: torch.Tensor) -> float:
    """Share of images whose top class is in their accepted set."""
    if len(logits) == 0:
        return float("nan")
    return accepted.gather(1, logits.argmax(1, keepdim=True)).float().mean().item()


class PhotoMix:
    """The photos of a run, normalised on the device, and the sampler that draws `per_batch` of
    them into each batch."""

    def __init__(self, photos: PhotoSet, norm: Normalization, per_batch: int, seed: int, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format, balance: float = 0.0):
        self.raw = torch.as_tensor(photos.images)  # (P, 28, 28) uint8 on the CPU: the OOD score's bank
        views = 1 if photos.views is None else 1 + photos.views.shape[1]
        # view-major: the photos as taken, then each photo's second view, and so on
        drawn = photos.images if views == 1 else np.concatenate([photos.images, *photos.views.swapaxes(0, 1)])
        self.images = to_tensor(drawn, norm.mean, norm.std, device).contiguous(memory_format=memory_format)
        self.accepted = torch.as_tensor(photos.accepted, device=device).repeat(views, 1)  # (P * views, classes) bool
        self.per_batch = per_batch
        self.sampler = BatchSampler(len(drawn), per_batch, seed + SAMPLER_SEED, device,
                                    label_weights(photos.labels * views, balance) if balance else None)

    def add_to(self, x: torch.Tensor, y: torch.Tensor, ctx: Dist) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with this process's share of the next photos appended; targets as sets."""
        idx = ctx.my_share(self.sampler.next())
        one_class = F.one_hot(y, self.accepted.shape[1]).bool()
        return torch.cat([x, self.images[idx]]), torch.cat([one_class, self.accepted[idx]])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def label_weights(labels: list[str], balance: float) -> torch.Tensor:
    """Per photo, its label's count to the power -balance: each label is drawn in proportion to
    its count to the power 1 - balance (1: every label as often)."""
    _, index, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    return torch.as_tensor(counts[index], dtype=torch.float64) ** -balance


def photos_per_batch(cfg: TrainConfig, world_size: int) -> int:
    """How many of each batch's images are photos: --photo-share of it, in equal shares per
    process."""
    count = round(cfg.batch_size * cfg.photo_share)
    if cfg.photo_share > 0 and (count == 0 or count >= cfg.batch_size):
        raise FmnistError(f"--photo-share {cfg.photo_share:g} of a batch of {cfg.batch_size} leaves no "
                          "photos or no dataset images")
    if count % world_size:
        raise FmnistError(f"--photo-share: {count} photos a batch do not split into {world_size} equal shares")
    return count


def photo_mix(cfg: TrainConfig, norm: Normalization, device: torch.device, world_size: int, log,
              memory_format: torch.memory_format = torch.contiguous_format, progress: bool = False) -> PhotoMix | None:
    """The run's PhotoMix, or None when it trains on the dataset alone (--photo-share 0)."""
    if cfg.photo_share == 0:
        return None
    per_batch = photos_per_batch(cfg, world_size)
    directory = find_photos_dir(cfg.photos)
    photos = load_photo_set(directory, "train", progress=progress, views=cfg.photo_views)
    if not len(photos):
        raise FmnistError(f"--photos {directory}: no usable photos in train/ (labels with classes: "
                          f"{', '.join(sorted(ACCEPTED))})")
    log(f"photos: {len(photos)} from {directory / 'train'} ({photos.refused} with nothing found on them left out), "
        + (f"{cfg.photo_views} views of each, " if cfg.photo_views > 1 else "")
        + f"{per_batch} in each batch of {cfg.batch_size}"
        + (f", labels balanced to the power {cfg.photo_balance:g}" if cfg.photo_balance else ""))
    return PhotoMix(photos, norm, per_batch, cfg.seed, device, memory_format, cfg.photo_balance)


def photo_validation(cfg: TrainConfig, model: torch.nn.Module, norm: Normalization, device: torch.device,
                     log) -> dict[str, float]:
    """{"photo_val_accuracy": top-1 in the accepted set on DIR/validation/}, said in the log; {}
    for a run without photos or a folder without that split."""
    if cfg.photo_share == 0:
        return {}
    photos = load_photo_set(find_photos_dir(cfg.photos), "validation")
    if not len(photos):
        return {}
    logits = predict_logits(model, to_tensor(photos.images, norm.mean, norm.std, device), tta=cfg.tta)
    accuracy = set_accuracy(logits, torch.as_tensor(photos.accepted, device=device))
    log(f"photo validation accuracy {accuracy:.4f} (top-1 in the accepted classes, {len(photos)} photos)")
    return {"photo_val_accuracy": accuracy}
