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
        image.draft("RGB", (WORK_SIZE, WORK_SIZE))  # DCT scaling: decode at 1/2, 1/4 or 1/8 size
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


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Colours 0..255 as float32 (H, W, 3); transparent areas become white, as viewers show them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and float greys
        a = np.asarray(image, dtype=np.float32)
        peak = a.max() if a.size else 0.0
        grey = a * (255.0 / peak) if peak > 255 else a
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Grey levels of colours, weighted as Pillow's "L" (ITU-R 601)."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _opencv():
    """OpenCV when the `photo` extra is installed, else None: the simple preparation then serves."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


# ----------------------------------------------------------------------------- preprocessing


class NoObject(ImageError):
    """A picture in which nothing stands out from the background: blank, uniform, or noise."""

    status = 422


def _no_object(name: str) -> NoObject:
    return NoObject(f"{name}: no object found: the picture looks blank or uniform")


def _quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile (nearest rank) of a 1-D array, cheaper than np.percentile on small ones."""
    k = min(len(values) - 1, int(q * len(values)))
    return float(np.partition(values, k)[k])


def _object_box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """The rows and columns holding object pixels. A row or column needs a few of them, so
    isolated noise specks do not stretch the box."""
    h, w = mask.shape
    rows = np.flatnonzero(mask.sum(1) >= 1 + w // 256)
    cols = np.flatnonzero(mask.sum(0) >= 1 + h // 256)
    if not rows.size or not cols.size:
        return None
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _stretch(level: np.ndarray, object_pixels: np.ndarray) -> np.ndarray:
    """Levels scaled so the object's brightest pixels reach 255, as the dataset's objects do."""
    if object_pixels.size:
        level *= 255.0 / max(_quantile(object_pixels, 0.995), 1e-6)
    return np.minimum(level, 255.0, out=level)


def _grey_level(grey: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice] | None]:
    """The simple preparation, without OpenCV: the median border pixel is the background; grey
    levels OBJECT_LEVEL away from it, on the side away from it, are the object."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = _quantile(border, 0.5)
    if background > 127.5:  # a dark object on a light ground: negate, as the dataset did
        grey = 255.0 - grey
        background = 255.0 - background
    level = np.maximum(grey - background, 0.0)
    level = _stretch(level, level[level > OBJECT_LEVEL])
    return level, _object_box(level > OBJECT_LEVEL)


def _fit_to_frame(level: np.ndarray) -> np.ndarray:
    """A cropped object as uint8 (28, 28): longest side resized to 28, centred on black."""
    h, w = level.shape
    scale = IMAGE_SIZE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = Image.fromarray(np.ascontiguousarray(level, dtype=np.float32), mode="F")
    small = np.asarray(small.resize(size, Image.Resampling.LANCZOS))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    x0, y0 = (IMAGE_SIZE - size[0]) // 2, (IMAGE_SIZE - size[1]) // 2
    out[y0 : y0 + size[1], x0 : x0 + size[0]] = np.clip(small + 0.5, 0, 255).astype(np.uint8)
    return out


def _prepare_dataset_size(image: Image.Image, name: str) -> np.ndarray:
    """A 28x28 picture is taken to be a Fashion-MNIST image already: only negated when its
    ground is light and stretched when it is dim; no background model, no crop."""
    grey = np.asarray(image if image.mode == "L" else Image.fromarray(_luma(_to_rgb(image))).convert("L"))
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    if np.median(border) > 127.5:
        grey = 255 - grey
    low, peak = int(grey.min()), int(grey.max())
    if peak - low < FLAT_LEVELS:
        raise _no_object(name)
    if peak >= 254:  # the dataset's objects peak at 254-255
        return np.array(grey, dtype=np.uint8)
    return np.clip(grey * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


# The background model. A photo's ground is rarely uniform: light falls off across it, corners
# darken, it has a colour and a texture. So the ground's colour is modelled as a smooth surface
# (a quadratic in x and y per channel, fitted to the picture's border, robust to the object
# touching it), and its remaining variation (noise, texture, JPEG) as a colour covariance. A
# pixel's distance from the ground is its Mahalanobis distance: in colour, so a red shirt on
# brown wood of the same grey stands out, and in units of the ground's own variation, so wood
# grain does not. The distance is linear in the object's density over the ground, which is
# what the dataset's intensities are (a dark garment on white: 255 minus the grey).
ANALYSIS_SIZE = 256  # pixels: the background model and the object mask work at this longest side
BORDER_BAND = 0.03  # of the shorter side: the band along the edges the ground is fitted to
NOISE_FLOOR = 2.0  # grey levels added to the ground's spread: quantisation, clean PNGs
OBJECT_SIGMAS = 4.0  # a pixel is object when this many ground spreads away from the ground
LEVEL_FLOOR = 2.0  # ground spreads subtracted from every distance, so the ground goes black
MIN_OBJECT_AREA = 0.002  # of the picture: smaller blobs are specks of noise or texture
KEEP_FRACTION = 0.15  # of the largest blob's area: smaller blobs are not part of the object
FLAT_LEVELS = 3  # a 28x28 picture whose grey levels span less than this is blank


def _surface_basis(h: int, w: int) -> np.ndarray:
    """(H, W, 6): 1, x, y, x^2, xy, y^2 with x and y in -1..1: a quadratic surface's terms."""
    y, x = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32),
                       indexing="ij")
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)


def _fit_ground(rgb: np.ndarray, basis: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ground colour (H, W, 3), whitening matrix (3, 3)) fitted to the pixels in `sample`,
    trimming those far from the fit (the object where it crosses the border) in a few rounds."""
    a, b = basis[sample], rgb[sample]  # (n, 6), (n, 3)
    keep = np.ones(len(a), dtype=bool)
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(a[keep], b[keep], rcond=None)
        residual = b - a @ coef
        distance = np.sqrt((residual * residual).sum(1))
        keep = distance <= 2.5 * np.median(distance) + 1.0
    covariance = np.cov(residual[keep].T) + NOISE_FLOOR**2 * np.eye(3)
    values, vectors = np.linalg.eigh(covariance)
    whiten = (vectors / np.sqrt(values)) @ vectors.T
    return basis @ coef, whiten.astype(np.float32)


def _photo_level(rgb: np.ndarray, cv2) -> tuple[np.ndarray, tuple[slice, slice] | None]:
    """(level, box) of a photo: its distance from the modelled ground, the object's box."""
    h, w = rgb.shape[:2]
    scale = ANALYSIS_SIZE / max(h, w)
    if scale < 1:
        h, w = max(1, round(h * scale)), max(1, round(w * scale))
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    basis = _surface_basis(h, w)
    band = max(1, round(BORDER_BAND * min(h, w)))
    border = np.zeros((h, w), dtype=bool)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    ground, whiten = _fit_ground(rgb, basis, border)
    residual = (rgb - ground) @ whiten  # whiten is symmetric
    distance = np.sqrt((residual * residual).sum(-1))

    mask = (distance > OBJECT_SIGMAS).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    if not areas.size or areas.max() < MIN_OBJECT_AREA * h * w:
        return distance, None
    kept = np.flatnonzero(areas >= max(KEEP_FRACTION * areas.max(), MIN_OBJECT_AREA * h * w)) + 1
    blobs = np.isin(labels, kept)
    gate = cv2.dilate(blobs.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    level = np.maximum(distance - LEVEL_FLOOR, 0.0) * gate
    level = _stretch(level, level[blobs & (distance > OBJECT_SIGMAS)])
    rows, cols = np.flatnonzero(blobs.any(1)), np.flatnonzero(blobs.any(0))
    return level, (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))


def prepare_image(image: Image.Image | np.ndarray, *, name: str | None = None) -> np.ndarray:
    """A picture as a Fashion-MNIST image: uint8 (28, 28), a light object on black, centred,
    its longest side 28 pixels. Raises NoObject when nothing stands out from the background.

    EXIF orientation applied. A 28x28 picture is taken as a dataset image (negated if its ground
    is light). Otherwise, with OpenCV: the ground modelled from the border (smooth colour
    surface plus colour spread), each pixel's colour distance from it, the object as the large
    blobs far from it; without OpenCV: the median border grey as the ground. Then levels
    stretched so the object peaks at 255, cropped to the object, longest side resized to 28
    keeping the aspect ratio, padded to 28x28 around the centre.
    """
    name = name or "<image>"
    if isinstance(image, np.ndarray):  # pixel values 0..255, (H, W) grey or (H, W, 3|4) colour
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(image))
    image = ImageOps.exif_transpose(image)
    if image.size == (IMAGE_SIZE, IMAGE_SIZE):
        return _prepare_dataset_size(image, name)
    if max(image.size) > WORK_SIZE:
        image = image.copy()
        image.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX)
    rgb = _to_rgb(image)
    if rgb.size == 0:
        raise ImageError(f"{name}: image has no pixels")
    cv2 = _opencv()
    level, box = _photo_level(rgb, cv2) if cv2 is not None else _grey_level(_luma(rgb))
    if box is None:
        raise _no_object(name)
    return _fit_to_frame(level[box])


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
                inputs.append((str(path), prepare_image(image, name=str(path))))
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
