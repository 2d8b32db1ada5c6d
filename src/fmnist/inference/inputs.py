"""The files `fmnist predict` and `fmnist explain` read (pictures, .npy and IDX batches), and
the 28x28 inputs they write back (`--save-input`)."""
from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fmnist import FmnistError
from fmnist.data import IMAGE_SIZE, DataError, load_idx
from fmnist.inference.decode import open_image
from fmnist.inference.photo import prepare_image
from fmnist.io import atomic_open


def input_png(image: np.ndarray) -> bytes:
    """The 28x28 image the model saw, as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()




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


def read_each(paths: Sequence[str | os.PathLike], verb: str = "answered",
              ) -> list[list[tuple[str, np.ndarray]] | FmnistError]:
    """`read_inputs` file by file: per path, its inputs, or the error that refused it (a picture
    with nothing on it, a file that is not an image), so one bad file in a folder does not cost
    the others their answers. A single file's error is raised as it is; when every file is
    refused, "none of the N files could be <verb>"."""
    if len(paths) == 1:
        return [read_inputs(paths)]
    read = []
    for path in paths:
        try:
            read.append(read_inputs([path]))
        except FmnistError as e:
            read.append(e)
    if read and all(isinstance(got, FmnistError) for got in read):
        raise FmnistError(f"none of the {len(paths)} files could be {verb}; the first: {read[0]}")
    return read


def answered(read: list[list[tuple[str, np.ndarray]] | FmnistError]) -> list[tuple[str, np.ndarray]]:
    """The inputs of the files `read_each` could read, in order."""
    return [item for got in read if not isinstance(got, FmnistError) for item in got]


def input_stem(name: str) -> str:
    """The PNG name (without .png) of an input: `shoe.jpg` -> `shoe`, image 1 of a batch,
    `batch.npy[1]` -> `batch-1`."""
    found = re.fullmatch(r"(.*)\[(\d+)\]", name)
    return f"{Path(found[1]).stem}-{found[2]}" if found else Path(name).stem


def save_inputs(directory: str | os.PathLike, inputs: Sequence[tuple[str, np.ndarray]]) -> list[Path]:
    """Write each 28x28 model input as a PNG named after its input (`input_stem`; a name taken
    twice gets -2, -3...); returns the paths."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FmnistError(f"{directory}: cannot create folder ({e.strerror})") from None
    written = []
    for stem, (_, image) in zip(file_stems([name for name, _ in inputs]), inputs, strict=True):
        path = directory / f"{stem}.png"
        with atomic_open(path) as f:
            f.write(input_png(image))
        written.append(path)
    return written


def file_stems(names: Sequence[str]) -> list[str]:
    """A distinct file name stem per input name (`input_stem`; a stem taken twice gets -2,
    -3...)."""
    stems, used = [], set()
    for name in names:
        stem = input_stem(name)
        candidate, n = stem, 1
        while candidate in used:
            n += 1
            candidate = f"{stem}-{n}"
        used.add(candidate)
        stems.append(candidate)
    return stems
