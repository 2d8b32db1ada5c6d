"""Pictures in: decoding with limits. A file or upload is checked from its header (format,
pixel count, bytes) before any pixel is decoded, so a decompression bomb or a lying header ends
in one clear error (an ImageError carrying the HTTP status the service answers)."""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from fmnist import FmnistError
from fmnist.config import MAX_PIXELS

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # what Pillow may decode for us
WORK_SIZE = 512  # pixels: JPEGs decode at least this large; without OpenCV, pictures shrink to it
# Bytes of metadata a picture may carry before its pixels (EXIF with a thumbnail, ICC profile,
# XMP: tens to hundreds of KB in photos), and the most bytes any format needs per pixel and channel.
HEADER_BYTES = 1024 * 1024
PIXEL_BYTES = 4


class ImageError(FmnistError):
    """An input that is not a usable image; `status` is the HTTP code the service answers."""

    status = 400


class UnsupportedImage(ImageError):
    status = 415


class ImageTooLarge(ImageError):
    status = 413





def open_image(source: str | os.PathLike | bytes | BinaryIO, name: str | None = None,
               max_pixels: int = MAX_PIXELS, load: bool = True) -> Image.Image:
    """Decode a PNG, JPEG, WebP, BMP or GIF (its first frame), refusing anything else, any image
    of more than `max_pixels` (checked from the header, before the pixels are decoded), a file
    far larger than its pixels need (`check_file_size`) and truncated or corrupt files. JPEGs
    are decoded directly at a reduced scale when large. With `load=False` only the header is
    read: `load_pixels` decodes later.

    Work grows with pixels, not bytes: bytes over HEADER_BYTES are only parsed once the header
    read from the first HEADER_BYTES has shown that the pixels need them."""
    name = name or (str(source) if isinstance(source, str | os.PathLike) else "<image>")
    size = None
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty file")
        size = len(source)
        if size > HEADER_BYTES:
            _check_header(source, name, max_pixels)
        source = io.BytesIO(source)
    elif isinstance(source, str | os.PathLike) and os.path.isfile(source):
        size = os.path.getsize(source)
    image = _open(source, name, max_pixels)
    if size is not None:
        check_file_size(image, size, name)
    if image.format == "JPEG":
        image.draft("RGB", (WORK_SIZE, WORK_SIZE))  # DCT scaling: decode at 1/2, 1/4 or 1/8 size
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{name}: image is {width}x{height} pixels, more than the limit of {max_pixels:,} pixels")
    return load_pixels(image, name) if load else image


def _open(source, name: str, max_pixels: int, formats: Sequence[str] = IMAGE_FORMATS) -> Image.Image:
    """Image.open with its errors as ImageErrors."""
    try:
        with warnings.catch_warnings():
            # Our own limit is stricter; Pillow's own bomb check only warns below 2x its limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(source, formats=formats)
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


def image_format(data: bytes) -> str | None:
    """The supported format whose signature `data` starts with, by Pillow's own checks; None
    for anything else."""
    Image.init()
    for fmt in IMAGE_FORMATS:
        accept = Image.OPEN[fmt][1]
        if accept is None or accept(data[:16]) is True:
            return fmt
    return None


def _check_header(data: bytes, name: str, max_pixels: int) -> None:
    """For a file over HEADER_BYTES: its header must lie in the first HEADER_BYTES (Pillow
    parses metadata before the pixels in Python, a few tenths of a second per MiB), and the
    whole file must fit the pixels that header declares."""
    fmt = image_format(data)
    if fmt is None:
        raise UnsupportedImage(
            f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})")
    if fmt == "WEBP":  # libwebp parses WebP's header in C, and wants the whole file
        return
    try:
        probe = _open(io.BytesIO(data[:HEADER_BYTES]), name, max_pixels, formats=(fmt,))
    except ImageTooLarge:
        raise
    except ImageError:
        raise ImageTooLarge(f"{name}: no {fmt} header in its first {HEADER_BYTES:,} bytes: more "
                            "metadata before the pixels than a picture has, or a corrupt file") from None
    with probe:
        check_file_size(probe, len(data), name)


def check_file_size(image: Image.Image, size: int, name: str = "<image>") -> None:
    """Refuse a file of `size` bytes far larger than the pixels its header declares need:
    beyond HEADER_BYTES of metadata, at most PIXEL_BYTES per pixel and channel (no supported
    format needs more, compressed or not). Crafted files (a 16x16 BMP padded with 9 MiB of
    no-op codes, a PNG of empty private chunks) would otherwise cost time per byte."""
    width, height = image.size
    allowed = HEADER_BYTES + PIXEL_BYTES * width * height * len(image.getbands())
    if size > allowed:
        raise ImageTooLarge(f"{name}: {size:,} bytes is far more than a {width}x{height} image needs "
                            f"(at most {allowed:,})")


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


