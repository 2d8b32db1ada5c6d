"""Folders of labelled real photos, prepared once as the predictor prepares a picture and kept:
the 28x28 images training mixes into its batches and the out-of-distribution score compares
with, so training and prediction see the same images.

A training set may hold more than one view of each photo (`--photo-views K`): the photo as
taken, and K-1 versions of it as another person might have taken it (`photo_view`: framed
closer, the camera turned a little, other light, another colour, softer focus), each prepared
the same way, so a few thousand photos teach the preparation's answers to many more.

Prepared sets are cached under ~/.cache/fmnist/photos/, keyed by the photos' paths, sizes and
times, by the number of views and by the preparation's own source, so a changed photo or a
changed preparation is prepared again.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from tqdm.auto import tqdm

from fmnist import FmnistError
from fmnist.data import CLASS_NAMES, IMAGE_SIZE
from fmnist.data.locate import cache_dir
from fmnist.data.photos import list_photos
from fmnist.inference.decode import open_image
from fmnist.inference.photo import prepare_image
from fmnist.io import atomic_open

VIEW_SEED = 20_261_207  # the views are the same for every run: one cache serves all seeds
PER_WORKER = 500  # photos (views counted) per thread preparing them: a smaller set is prepared on this one


@dataclass
class PhotoSet:
    """Prepared photos of one split: images uint8 (N, 28, 28), accepted classes bool (N, classes),
    labels and files; `refused` counts the photos the preparation found nothing on. `views`, uint8
    (N, K-1, 28, 28), holds the other views of each photo (none unless asked for)."""

    images: np.ndarray
    accepted: np.ndarray
    labels: list[str]
    files: list[str]
    refused: int = 0
    views: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)


def photo_view(picture: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The picture as someone else might have taken it: framed closer (each side keeps 70-100%,
    so a sleeve may touch the edge), the camera turned by up to 8 degrees, brighter or darker,
    more or less contrast and colour, the colour channels sometimes swapped (a garment and a
    ground of other colours), and sometimes out of focus or taken with fewer pixels."""
    view = picture.convert("RGB")
    angle = rng.uniform(-8.0, 8.0)
    w, h = view.size
    view = view.rotate(angle, resample=Image.BILINEAR)
    sin, cos = abs(np.sin(np.radians(angle))), np.cos(np.radians(angle))
    # the rotated frame's corners are empty: keep only what the camera saw (and a pixel more,
    # which the resampling blends with the empty corners)
    dx, dy = h / 2 * sin + w / 2 * (1 - cos) + 2, w / 2 * sin + h / 2 * (1 - cos) + 2
    left, top, right, bottom = dx, dy, w - dx, h - dy
    keep_w, keep_h = (right - left) * rng.uniform(0.7, 1.0), (bottom - top) * rng.uniform(0.7, 1.0)
    x0 = left + rng.uniform(0, right - left - keep_w)
    y0 = top + rng.uniform(0, bottom - top - keep_h)
    view = view.crop((round(x0), round(y0), round(x0 + keep_w), round(y0 + keep_h)))
    for enhance, low, high in ((ImageEnhance.Brightness, 0.7, 1.3), (ImageEnhance.Contrast, 0.7, 1.3),
                               (ImageEnhance.Color, 0.5, 1.5)):
        view = enhance(view).enhance(rng.uniform(low, high))
    if rng.random() < 0.5:
        view = Image.merge("RGB", [view.getchannel(int(c)) for c in rng.permutation(3)])
    if rng.random() < 0.3:
        view = view.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    if rng.random() < 0.3:
        scale = rng.uniform(0.3, 0.7)
        view = view.resize((max(1, round(view.width * scale)), max(1, round(view.height * scale))), Image.BILINEAR)
    return view


def _cache_key(paths: list[Path], views: int) -> str:
    digest = hashlib.sha256(f"views {views}\n".encode())
    for function in (prepare_image, open_image, photo_view):  # the preparation itself: edited code prepares again
        digest.update(Path(inspect.getfile(function)).read_bytes())
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _prepared_views(picture: Image.Image, first: np.ndarray, count: int, rng: np.random.Generator,
                    name: str) -> np.ndarray:
    """`count` other views of a photo, prepared; a view the preparation finds nothing on (framed
    too close) is the photo as taken instead."""
    views = np.empty((count, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    for k in range(count):
        try:
            views[k] = prepare_image(photo_view(picture, rng), name=name)
        except FmnistError:
            views[k] = first
    return views


def _prepare_photo(job: tuple[Path, int, int]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One photo prepared, and its other views (None when only the photo as taken is asked
    for); (None, None) when nothing is found on it or it is not a picture."""
    path, index, views = job
    try:
        with open_image(path) as picture:
            image = prepare_image(picture, name=str(path))
            if views == 1:
                return image, None
            rng = np.random.default_rng([VIEW_SEED, index])
            return image, _prepared_views(picture, image, views - 1, rng, str(path))
    except FmnistError:
        return None, None


def load_photo_set(directory: str | os.PathLike, split: str = "train", use_cache: bool = True,
                   progress: bool = False, views: int = 1) -> PhotoSet:
    """The photos of DIR/<split>/ whose labels have classes, prepared (from the cache when the
    same photos were prepared by the same code before); with `views` > 1, each photo's other
    views too (`photo_view`, drawn from VIEW_SEED and the photo's place in the folder)."""
    files = list_photos(directory, split)
    cache = cache_dir() / "photos" / f"{_cache_key(files.paths, views)}.npz"
    if use_cache and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as saved:
                return PhotoSet(saved["images"], saved["accepted"], saved["labels"].tolist(),
                                saved["files"].tolist(), int(saved["refused"]),
                                saved["views"] if views > 1 else None)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is prepared again
    jobs = [(path, i, views) for i, path in enumerate(files.paths)]
    workers = min(os.cpu_count() or 1, len(jobs) * views // PER_WORKER)
    images, other, kept, refused = [], [], [], 0
    with ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        prepared = pool.map(_prepare_photo, jobs) if pool else map(_prepare_photo, jobs)
        for i, (image, image_views) in enumerate(tqdm(prepared, total=len(jobs), desc=f"preparing {split} photos",
                                                      unit="photo", disable=not progress)):
            if image is None:  # nothing found on it, or not a picture: not a training example
                refused += 1
                continue
            images.append(image)
            other.append(image_views)
            kept.append(i)
    accepted = files.accepted(CLASS_NAMES)[kept]
    def stacked(arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.stack(arrays) if arrays else np.zeros((0, *shape), np.uint8)

    frame = (IMAGE_SIZE, IMAGE_SIZE)
    result = PhotoSet(stacked(images, frame), accepted, [files.labels[i] for i in kept],
                      [str(files.paths[i]) for i in kept], refused,
                      stacked(other, (views - 1, *frame)) if views > 1 else None)
    if use_cache:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(cache) as f:
                np.savez(f, images=result.images, accepted=result.accepted, labels=np.array(result.labels),
                         files=np.array(result.files), refused=refused,
                         **({"views": result.views} if views > 1 else {}))
        except OSError:
            pass  # no cache: prepared again next time
    return result
