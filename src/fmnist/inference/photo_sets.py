"""Folders of labelled real photos, prepared once as the predictor prepares a picture and kept:
the 28x28 images training mixes into its batches and the out-of-distribution score compares
with, so training and prediction see the same images.

Prepared sets are cached under ~/.cache/fmnist/photos/, keyed by the photos' paths, sizes and
times and by the preparation's own source, so a changed photo or a changed preparation is
prepared again.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from fmnist import FmnistError
from fmnist.data import CLASS_NAMES, IMAGE_SIZE
from fmnist.data.locate import cache_dir
from fmnist.data.photos import list_photos
from fmnist.inference.decode import open_image
from fmnist.inference.photo import prepare_image
from fmnist.io import atomic_open


@dataclass
class PhotoSet:
    """Prepared photos of one split: images uint8 (N, 28, 28), accepted classes bool (N, classes),
    labels and files; `refused` counts the photos the preparation found nothing on."""

    images: np.ndarray
    accepted: np.ndarray
    labels: list[str]
    files: list[str]
    refused: int = 0

    def __len__(self) -> int:
        return len(self.images)


def _cache_key(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for function in (prepare_image, open_image):  # the preparation itself: edited code prepares again
        digest.update(Path(inspect.getfile(function)).read_bytes())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def load_photo_set(directory: str | os.PathLike, split: str = "train", use_cache: bool = True,
                   progress: bool = False) -> PhotoSet:
    """The photos of DIR/<split>/ whose labels have classes, prepared (from the cache when the
    same photos were prepared by the same code before)."""
    files = list_photos(directory, split)
    cache = cache_dir() / "photos" / f"{_cache_key(files.paths)}.npz"
    if use_cache and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as saved:
                return PhotoSet(saved["images"], saved["accepted"], saved["labels"].tolist(),
                                saved["files"].tolist(), int(saved["refused"]))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is prepared again
    images, kept, refused = [], [], 0
    for i, path in enumerate(tqdm(files.paths, desc=f"preparing {split} photos", unit="photo", disable=not progress)):
        try:
            with open_image(path) as picture:
                images.append(prepare_image(picture, name=str(path)))
            kept.append(i)
        except FmnistError:  # nothing found on it, or not a picture: not a training example
            refused += 1
    accepted = files.accepted(CLASS_NAMES)[kept]
    result = PhotoSet(np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8),
                      accepted, [files.labels[i] for i in kept], [str(files.paths[i]) for i in kept], refused)
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(cache) as f:
                np.savez(f, images=result.images, accepted=result.accepted, labels=np.array(result.labels),
                         files=np.array(result.files), refused=refused)
        except OSError:
            pass  # no cache: prepared again next time
    return result
