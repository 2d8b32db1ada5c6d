"""Pictures in, Fashion-MNIST images out: decoding with limits, the photo preparation that makes
any picture look like a dataset image, and reading the inputs `fmnist predict` takes (pictures,
.npy and IDX batches).

Fashion-MNIST was made from product photos: the edges close to the corner colour trimmed, the
longest side resized to 28, the short side padded, intensities negated, 8-bit grey. `prepare_image`
does the same to any picture, so the service, the CLI and the tests share one preprocessing.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmnist import FmnistError
from fmnist.data import IMAGE_SIZE, DataError, load_idx
from fmnist.io import atomic_open

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what Pillow may decode for us
MAX_PIXELS = 25_000_000  # decoded pixels of one image (after JPEG's draft scaling): <= 100 MB RGBA
WORK_SIZE = 512  # pixels: larger pictures are shrunk to this longest side before any analysis
OBJECT_LEVEL = 0.05 * 255  # the dataset's trim threshold: 5% of full intensity above background


class ImageError(FmnistError):
    """An input that is not a usable image; `status` is the HTTP code the service answers."""

    status = 400


class UnsupportedImage(ImageError):
    status = 415


class ImageTooLarge(ImageError):
    status = 413


# ----------------------------------------------------------------------------- decoding


def open_image(source: str | os.PathLike | bytes | BinaryIO, name: str | None = None,
               max_pixels: int = MAX_PIXELS, load: bool = True) -> Image.Image:
    """Decode a PNG, JPEG, WebP, BMP or GIF (its first frame), refusing anything else, any image
    of more than `max_pixels` (checked from the header, before the pixels are decoded) and
    truncated or corrupt files. JPEGs are decoded directly at a reduced scale when large.
    With `load=False` only the header is read: `load_pixels` decodes later."""
    name = name or (str(source) if isinstance(source, str | os.PathLike) else "<image>")
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty file")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            # Our own limit below is stricter; Pillow's own bomb check only warns below 2x its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source, formats=IMAGE_FORMATS)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory") from None
    except Image.DecompressionBombError as e:  # Pillow's own check, at twice its limit
        raise ImageTooLarge(f"{name}: image has more than the limit of {max_pixels:,} pixels ({e})") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(
            f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or e})") from None
    if image.format == "JPEG":
        image.draft("L", (WORK_SIZE, WORK_SIZE))  # DCT scaling: decode at 1/2, 1/4 or 1/8 size
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name}: image is {width}x{height} pixels, more than the limit of {max_pixels:,} pixels")
    return load_pixels(image, name) if load else image


def load_pixels(image: Image.Image, name: str = "<image>") -> Image.Image:
    """Decode the pixels of an image opened by `open_image(..., load=False)`."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: truncated or corrupt {image.format} image ({e})") from None
    return image


def _to_grey(image: Image.Image) -> np.ndarray:
    """Grey levels 0..255 as float32 (H, W); transparent areas become white, as viewers show them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and float greys
        a = np.asarray(image, dtype=np.float32)
        peak = a.max() if a.size else 0.0
        return a * (255.0 / peak) if peak > 255 else a
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


# ----------------------------------------------------------------------------- preprocessing


def _quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile (nearest rank) of a 1-D array, cheaper than np.percentile on small ones."""
    k = min(len(values) - 1, int(q * len(values)))
    return float(np.partition(values, k)[k])


def _object_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the rows and columns holding object pixels. A row or
    column needs a few of them, so isolated noise specks do not stretch the box."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.sum(1) >= 1 + w // 256)
    cols = np.flatnonzero(mask.sum(0) >= 1 + h // 256)
    if not rows.size or not cols.size:
        return None
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def prepare_image(image: Image.Image | np.ndarray) -> np.ndarray:
    """A picture as a Fashion-MNIST image: uint8 (28, 28), a light object on black, centred,
    its longest side 28 pixels.

    EXIF orientation applied; grey; the background (the median border pixel) inverted to dark
    when it is light; background levelled to 0 and the object's brightest pixels to 255;
    cropped to the object; longest side resized to 28 keeping the aspect ratio; padded to
    28x28 around the centre.
    """
    if isinstance(image, np.ndarray):  # pixel values 0..255, (H, W) grey or (H, W, 3|4) colour
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(image))
    image = ImageOps.exif_transpose(image)
    if max(image.size) > WORK_SIZE:
        image = image.copy()
        image.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
    grey = _to_grey(image)
    if grey.size == 0:
        raise ImageError("image has no pixels")

    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = _quantile(border, 0.5)
    if background > 127.5:  # a dark object on a light ground: negate, as the dataset did
        grey = 255.0 - grey
        background = 255.0 - background
    level = grey - background
    np.maximum(level, 0.0, out=level)
    above = level[level > OBJECT_LEVEL]
    if above.size:  # the dataset's objects peak at 254-255: stretch dim photos to match
        level *= 255.0 / max(_quantile(above, 0.995), 1.0)
    np.minimum(level, 255.0, out=level)

    box = _object_box(level > OBJECT_LEVEL)
    if box is not None:
        top, bottom, left, right = box
        level = level[top:bottom, left:right]
    h, w = level.shape
    scale = IMAGE_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(level, mode="F").resize(size, Image.Resampling.LANCZOS)
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    x0, y0 = (IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2
    out[y0 : y0 + size[1], x0 : x0 + size[0]] = np.clip(np.asarray(small) + 0.5, 0, 255).astype(np.uint8)
    return out


def is_prepared(array: np.ndarray) -> bool:
    """Whether an array already holds Fashion-MNIST images: uint8, (28, 28) or (N, 28, 28)."""
    return array.dtype == np.uint8 and array.ndim in (2, 3) and array.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)


def prepare_batch(images) -> np.ndarray:
    """uint8 (N, 28, 28) from one or many PIL images or arrays. Arrays that already are
    Fashion-MNIST images (uint8, last two dimensions 28x28) are used as they are; anything else
    is a picture and goes through `prepare_image`."""
    if isinstance(images, Image.Image | np.ndarray):
        images = [images]
    prepared = []
    for image in images:
        if isinstance(image, np.ndarray) and is_prepared(image):
            prepared.extend(image.reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
        elif isinstance(image, Image.Image | np.ndarray):
            prepared.append(prepare_image(image))
        else:
            raise TypeError(f"expected PIL images or numpy arrays, got {type(image).__name__}")
    if not prepared:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    return np.stack(prepared)


def input_png(image: np.ndarray) -> bytes:
    """The 28x28 image the model saw, as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- files


def _batch_from_array(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim not in (2, 3) or array.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{name}: expected images of shape (N, 28, 28) or (28, 28), found {array.shape}")
    if array.dtype.kind not in "iu":
        raise DataError(f"{name}: expected uint8 pixels 0..255, found {array.dtype}; "
                        "convert with (x * 255).round().astype(np.uint8)")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise DataError(f"{name}: pixel values must lie in 0..255")
    return array.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: expected one array, found an archive")
    return array


def _file_kind(path: Path) -> str:
    """"npy", "idx" (raw or gzipped) or "image", judged by the first bytes."""
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError:  # open_image names the problem
        return "image"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    return "idx" if head.startswith((b"\x1f\x8b", b"\x00\x00")) else "image"


def read_inputs(paths: Sequence[str | os.PathLike]) -> list[tuple[str, np.ndarray]]:
    """(name, prepared uint8 28x28 image) for every image in the files: each picture is one,
    each .npy or IDX batch gives one per image, named `file[i]`."""
    inputs = []
    for path in map(Path, paths):
        if path.is_dir():
            raise FmnistError(f"{path}: is a directory, not an image")
        kind = _file_kind(path)
        if kind != "image":
            array = _read_npy(path) if kind == "npy" else load_idx(path)
            batch = _batch_from_array(array, str(path))
            if array.ndim == 2:
                inputs.append((str(path), batch[0]))
            else:
                inputs += [(f"{path}[{i}]", image) for i, image in enumerate(batch)]
        else:
            with open_image(path) as image:
                inputs.append((str(path), prepare_image(image)))
    return inputs


def save_inputs(directory: str | os.PathLike, inputs: Sequence[tuple[str, np.ndarray]]) -> list[Path]:
    """Write each 28x28 model input as a PNG named after its file; returns the paths."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"{directory}: cannot create folder ({e.strerror})") from None
    written, used = [], set()
    for name, image in inputs:
        stem = Path(name.replace("[", "-").rstrip("]")).stem if "[" in name else Path(name).stem
        candidate, n = stem, 1
        while candidate in used:
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate)
        path = directory / f"{candidate}.png"
        with atomic_open(path) as f:
            f.write(input_png(image))
        written.append(path)
    return written
