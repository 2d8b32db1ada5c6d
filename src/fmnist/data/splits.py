"""Fashion-MNIST in memory: the class names, the train, validation and test splits as
normalised tensors on the device, and the sampler training slices its batches with."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from fmnist import FmnistError
from fmnist.data.idx import DataError, load_idx
from fmnist.data.locate import SPLITS, _file_in, find_data_dir

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28  # pixels, height and width

# Mean and standard deviation of the 60,000 training images on the 0..1 scale.
FMNIST_MEAN = 0.2860406
FMNIST_STD = 0.3530242


def _check_split(images: np.ndarray, labels: np.ndarray, images_path, labels_path) -> None:
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"{images_path}: expected uint8 images of 3 dimensions, found {images.dtype} {images.shape}"
        )
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{images_path}: expected {IMAGE_SIZE}x{IMAGE_SIZE} images, found {images.shape[1]}x{images.shape[2]}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_path}: expected a 1-dimensional integer label file, found {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: count mismatch: {len(labels)} labels for {len(images)} images in {images_path}"
        )
    if len(labels) == 0:
        raise DataError(f"{labels_path}: no examples")
    bad = np.flatnonzero((labels < 0) | (labels >= NUM_CLASSES))
    if bad.size:
        raise DataError(
            f"{labels_path}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside 0..{NUM_CLASSES - 1}"
        )


def load_split(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the "train" or "test" split."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose 'train' or 'test'")
    directory = find_data_dir(data_dir)
    images_info, labels_info = SPLITS[split]
    images_path = _file_in(directory, images_info.name)
    labels_path = _file_in(directory, labels_info.name)
    images, labels = load_idx(images_path), load_idx(labels_path)
    _check_split(images, labels, images_path, labels_path)
    return images, labels.astype(np.int64)


def one_hot(labels, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Labels (N,) as float32 one-hot rows (N, num_classes), as the post feeds them."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return np.eye(num_classes, dtype=np.float32)[labels]




def to_tensor(images, mean: float = 0.0, std: float = 1.0, device=None) -> torch.Tensor:
    """uint8 images (N, 28, 28) to float32 (N, 1, 28, 28): pixels/255, minus mean, over std."""
    x = torch.as_tensor(np.asarray(images), device=device).to(torch.float32)
    x = x.unsqueeze(1).div_(255.0)
    if mean != 0.0 or std != 1.0:
        x.sub_(mean).div_(std)
    return x


@dataclass(frozen=True)
class Normalization:
    """What a model's inputs are: (pixels / 255 - mean) / std."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def of_training_set(cls, standardize: bool) -> Normalization:
        """The training images' statistics when standardising (--normalize), else pixels / 255
        (the post)."""
        return cls(FMNIST_MEAN, FMNIST_STD) if standardize else cls()

    @property
    def black(self) -> float:
        """The normalised value of a black pixel, the dataset's background."""
        return -self.mean / self.std


@dataclass
class Split:
    images: torch.Tensor  # (N, 1, 28, 28) float32, normalised, on the device
    labels: torch.Tensor  # (N,) int64, on the device
    raw: torch.Tensor  # (N, 28, 28) uint8 on the CPU, for plots

    def __len__(self) -> int:
        return len(self.labels)


def load_test_split(norm: Normalization, data_dir=None, device=None) -> Split:
    """The 10,000 test images normalised as `norm` says, on the device (and raw, on the CPU)."""
    raw, labels = load_split("test", data_dir)
    return Split(to_tensor(raw, norm.mean, norm.std, device), torch.as_tensor(labels, device=device),
                 torch.as_tensor(raw))


def load_splits(val_size: int, norm: Normalization, data_dir=None, device=None) -> dict[str, Split]:
    """The "train", "val" (the first `val_size` training images, as the post's TF loader held
    them out) and "test" splits, normalised, on the device."""
    train_raw, train_labels = load_split("train", data_dir)
    test_raw, test_labels = load_split("test", data_dir)
    if not 0 <= val_size < len(train_raw):
        raise FmnistError(f"--val-size must be in [0, {len(train_raw) - 1}] (the training images less one), got {val_size}")

    def split(raw, labels) -> Split:
        return Split(to_tensor(raw, norm.mean, norm.std, device), torch.as_tensor(labels, device=device),
                     torch.as_tensor(raw))

    v = val_size
    return {"train": split(train_raw[v:], train_labels[v:]), "val": split(train_raw[:v], train_labels[:v]),
            "test": split(test_raw, test_labels)}


class BatchSampler:
    """Index batches over a reshuffled permutation each epoch. A batch that crosses an epoch's
    end takes the rest of that epoch and the start of the next, like the post's next_batch.
    With `weights` (n,), an epoch is n indices drawn with replacement in proportion to them."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device,
                 weights: torch.Tensor | None = None):
        self.n, self.batch_size, self.device = n, batch_size, device
        self.weights = None if weights is None else weights.double().cpu()
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.pos = 0
        self.perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=self.generator).to(self.device)
        return torch.randperm(self.n, generator=self.generator).to(self.device)

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + take])
            self.pos += take
            need -= take
            if self.pos == self.n:
                self.epoch += 1
                self.pos = 0
                self.perm = self._permutation()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epoch": self.epoch, "pos": self.pos, "perm": self.perm}

    def load_state_dict(self, state: dict) -> None:
        if len(state["perm"]) != self.n:
            raise ValueError(f"a permutation of {len(state['perm'])} images, this run has {self.n}")
        self.generator.set_state(state["generator"])
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.perm = state["perm"].to(self.device)
