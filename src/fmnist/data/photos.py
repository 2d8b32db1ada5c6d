"""Real photos of clothing as training and checking data: a folder laid out as
`DIR/train/<label>/*.jpg` (and optionally `DIR/validation/`, `DIR/test/`), whose labels are
people's words for garments (t-shirt, longsleeve, pants, shoes...). Each label stands for a set
of Fashion-MNIST classes a photo of it may rightly be called (partial labels: a long sleeve may
be a pullover or a shirt); labels with no class (shorts, skirt, hat) are left out of training.

    fmnist train --preset photo --photos data/clothing
    python bench/real_photos.py data/clothing/validation --models runs/photo

The preparation that turns each photo into a 28x28 image is `fmnist.inference.photo`'s; this
module only finds the files and says what each label accepts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmnist import FmnistError
from fmnist.data.splits import CLASS_NAMES

# People's labels -> the Fashion-MNIST classes a photo of one may be called.
ACCEPTED: dict[str, frozenset[str]] = {
    label: frozenset(classes)
    for label, classes in {
        "t-shirt": {"T-shirt/top"},
        "shirt": {"Shirt"},
        "longsleeve": {"Pullover", "Shirt"},
        "outwear": {"Coat"},
        "dress": {"Dress"},
        "pants": {"Trouser"},
        "shoes": {"Sandal", "Sneaker", "Ankle boot"},
        "polo": {"T-shirt/top", "Shirt"},
        "blouse": {"T-shirt/top", "Shirt"},
        "top": {"T-shirt/top"},
        "undershirt": {"T-shirt/top"},
        "hoodie": {"Pullover", "Coat"},
        "blazer": {"Coat"},
    }.items()
}
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
PHOTOS_ENV = "FMNIST_PHOTOS"
WHERE_TO_GET = ("a folder of labelled photos laid out as DIR/train/<label>/*.jpg, e.g. the CC0 "
                "clothing-dataset-small (github.com/alexeygrigorev/clothing-dataset-small): "
                "git clone it and give --photos PATH (or set $FMNIST_PHOTOS)")


def accepted_mask(label: str, class_names=CLASS_NAMES) -> np.ndarray:
    """bool (classes,): True for each class a photo of `label` may be called; all False for a
    label with no class."""
    accepted = ACCEPTED.get(label.lower(), frozenset())
    return np.array([name in accepted for name in class_names])


@dataclass
class PhotoFiles:
    """The labelled photos of one split: paths, labels, and the accepted classes of each."""

    paths: list[Path]
    labels: list[str]

    def accepted(self, class_names=CLASS_NAMES) -> np.ndarray:
        """bool (N, classes)."""
        return np.stack([accepted_mask(label, class_names) for label in self.labels]) if self.labels \
            else np.zeros((0, len(class_names)), dtype=bool)

    def __len__(self) -> int:
        return len(self.paths)


def find_photos_dir(photos: str | os.PathLike | None) -> Path:
    """--photos, or $FMNIST_PHOTOS: a folder with a train/ split of labelled photos."""
    given = photos if photos is not None else os.environ.get(PHOTOS_ENV)
    if not given:
        raise FmnistError(f"--photos is needed for this recipe: {WHERE_TO_GET}")
    directory = Path(given)
    if not (directory / "train").is_dir():
        raise FmnistError(f"--photos {directory}: no train/ folder there; expected {WHERE_TO_GET}")
    return directory


def list_photos(directory: str | os.PathLike, split: str = "train", with_class_only: bool = True) -> PhotoFiles:
    """The photos under DIR/<split>/<label>/, sorted; with `with_class_only`, only the labels
    that have Fashion-MNIST classes. A split folder that is missing gives no photos."""
    root = Path(directory) / split
    paths, labels = [], []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        label = label_dir.name.lower()
        if with_class_only and label not in ACCEPTED:
            continue
        for path in sorted(label_dir.iterdir()):
            if path.suffix.lower() in PHOTO_SUFFIXES and path.is_file():
                paths.append(path)
                labels.append(label)
    return PhotoFiles(paths, labels)
