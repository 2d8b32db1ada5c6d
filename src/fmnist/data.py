"""Fashion-MNIST on disk and in memory: IDX parsing with validation, locating and downloading
the four files, and the in-memory tensors (train, validation and test splits) that training
slices its batches from.

    fmnist download [--data-dir DIR]
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmnist import FmnistError
from fmnist.io import atomic_open, share_as_umask_allows

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

MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


class DataError(FmnistError):
    """A data file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name on the mirror, gzipped
    size: int  # bytes of the decompressed payload
    sha256: str  # of the decompressed payload


SPLITS = {
    "train": (
        IdxFile(
            "train-images-idx3-ubyte.gz",
            47_040_016,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        IdxFile(
            "train-labels-idx1-ubyte.gz",
            60_008,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
    ),
    "test": (
        IdxFile(
            "t10k-images-idx3-ubyte.gz",
            7_840_016,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        IdxFile(
            "t10k-labels-idx1-ubyte.gz",
            10_008,
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ),
}

# IDX element types: the third byte of the magic number.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------- parsing


def _read_payload(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not raw:
        raise DataError(f"{path}: empty file")
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
        if not raw:
            raise DataError(f"{path}: empty file (after gunzip)")
    elif path.suffix == ".gz":
        raise DataError(f"{path}: not a gzip file (named .gz but has no gzip header)")
    return raw


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX payload (already decompressed), checking its header against its length."""
    if len(raw) < 4:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{name}: bad magic number 0x{raw[:4].hex()} (not an IDX file)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{name}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    if not 1 <= ndim <= 4:
        raise DataError(f"{name}: unsupported number of dimensions {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) < expected:
        raise DataError(
            f"{name}: truncated file: header says {dims} needing {expected} bytes, found {len(raw)}"
        )
    if len(raw) > expected:
        raise DataError(f"{name}: {len(raw) - expected} unexpected trailing bytes after the data")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file, gzipped or raw, into a numpy array of its declared shape and type."""
    path = Path(path)
    return parse_idx(_read_payload(path), str(path))


def save_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped when the name ends in .gz), atomically."""
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot hold {array.dtype}")
    big_endian = array.astype(_IDX_DTYPES[code], copy=False)
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += big_endian.tobytes()
    path = Path(path)
    with atomic_open(path) as f:
        f.write(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)


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


# ----------------------------------------------------------------------------- locating


def _file_in(directory: Path, name: str) -> Path | None:
    """The gzipped or raw file of this name in a directory, if either exists."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _has_all(directory: Path) -> bool:
    return all(_file_in(directory, f.name) for files in SPLITS.values() for f in files)


def cache_dir() -> Path:
    """The user cache where downloads go: $XDG_CACHE_HOME/fmnist or ~/.cache/fmnist."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmnist"


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the data is looked for, in order."""
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get("FMNIST_DATA"):
        dirs.append(Path(os.environ["FMNIST_DATA"]))
    dirs += [Path("data/fashion"), cache_dir(), DEBIAN_DIR]
    return dirs


def find_data_dir(data_dir: str | os.PathLike | None = None, download_missing: bool = True) -> Path:
    """The first directory holding all four files; downloads them when none does.

    An explicit `data_dir` is the only place looked at (and downloaded into); otherwise
    $FMNIST_DATA, ./data/fashion, the user cache and Debian's package are tried in turn, and a
    download goes to the user cache.
    """
    dirs = search_dirs(data_dir)
    for d in dirs:
        if _has_all(d):
            return d
    target = Path(data_dir) if data_dir is not None else cache_dir()
    if not download_missing:
        looked = ", ".join(str(d) for d in dirs)
        raise DataError(f"Fashion-MNIST not found (looked in {looked}); run `fmnist download`")
    lacking = missing_files(target)
    try:
        fetch_into(target)
    except DataError as e:
        if data_dir is None:
            raise
        raise DataError(f"{data_dir}: {lacking}, and downloading them failed ({e}); {what_to_do(target)}") from None
    return target


def missing_files(directory: Path) -> str:
    """'no Fashion-MNIST files' or 'train-labels-idx1-ubyte.gz is missing': what a folder lacks."""
    if not directory.is_dir():
        return "no such folder"
    names = [f.name for files in SPLITS.values() for f in files if not _file_in(directory, f.name)]
    if len(names) == sum(len(files) for files in SPLITS.values()):
        return "no Fashion-MNIST files there"
    return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} missing"


def what_to_do(directory: Path) -> str:
    """The way out for a --data-dir without the data: where else it is, or how to get it."""
    elsewhere = next((d for d in search_dirs() if _has_all(d)), None)
    names = ", ".join(f.name for files in SPLITS.values() for f in files)
    advice = f"copy the four IDX files ({names}; gzipped or not) into it"
    if elsewhere is not None and elsewhere.resolve() != directory.resolve():
        return f"{advice}, or leave out --data-dir to use the copy in {elsewhere}"
    return f"{advice}, or run `fmnist download --data-dir {directory}` where the internet is reachable"


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


# ----------------------------------------------------------------------------- downloading


def _verify_payload(raw: bytes, info: IdxFile, origin: str) -> None:
    if len(raw) != info.size:
        raise DataError(f"{origin}: expected {info.size} bytes after gunzip, got {len(raw)}")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != info.sha256:
        raise DataError(f"{origin}: checksum mismatch (sha256 {digest[:16]}..., expected {info.sha256[:16]}...)")


def _fetch(url: str, dest: Path, info: IdxFile, progress: bool) -> None:
    """Download url into dest atomically: a temporary file in the same folder, checked, renamed."""
    from tqdm.auto import tqdm

    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        share_as_umask_allows(tmp)
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=30)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise DataError(f"cannot download {url}: {reason}") from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=info.name, disable=not progress
                ) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        _verify_payload(_read_payload(tmp), info, url)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download(
    data_dir: str | os.PathLike | None = None,
    mirror: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """Fetch the four files into data_dir (default: the user cache), verifying each.

    A file already present with the right payload is kept. Without `data_dir`, data found
    where fmnist looks for it (`search_dirs`) is checked and kept, and nothing is fetched. The
    mirror defaults to $FMNIST_MIRROR or the official one.
    """
    if data_dir is None:
        found = next((d for d in search_dirs() if _has_all(d)), None)
        if found is not None:
            verify_dir(found)
            log(f"Fashion-MNIST is already present in {found} (checked); nothing to download")
            return found
    target = Path(data_dir) if data_dir is not None else cache_dir()
    try:
        return fetch_into(target, mirror, progress, log)
    except DataError as e:
        elsewhere = next((d for d in search_dirs() if _has_all(d)), None)
        if elsewhere is None:
            raise
        raise DataError(f"{e}; the data is already in {elsewhere}, where fmnist finds it without --data-dir") from None


def fetch_into(target: Path, mirror: str | None = None, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """Fetch the four files into `target`, keeping those already there with the right payload."""
    mirror = mirror or os.environ.get("FMNIST_MIRROR") or MIRROR
    if not mirror.endswith("/"):
        mirror += "/"
    created = not target.exists()
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{target}: cannot create data folder ({e.strerror})") from None
    fetched = 0
    try:
        for files in SPLITS.values():
            for info in files:
                dest = target / info.name
                if _file_in(target, info.name) and _verified(_file_in(target, info.name), info, log):
                    continue
                _fetch(mirror + info.name, dest, info, progress)
                fetched += 1
    except DataError:
        if created and not any(target.iterdir()):
            target.rmdir()  # leave no empty folder behind a failed download
        raise
    log(f"Fashion-MNIST is in {target}" if fetched else f"Fashion-MNIST is already present in {target} (checked); nothing to download")
    return target


def _verified(path: Path, info: IdxFile, log) -> bool:
    """Whether a file holds the official payload; one that does not is said to be replaced."""
    try:
        _verify_payload(_read_payload(path), info, str(path))
        return True
    except DataError as e:
        log(f"replacing {path}: {e}")
        return False


def verify_dir(directory: Path) -> None:
    """Check the size and SHA-256 of the four files of a folder fmnist found the data in."""
    for files in SPLITS.values():
        for info in files:
            path = _file_in(directory, info.name)
            try:
                _verify_payload(_read_payload(path), info, str(path))
            except DataError as e:
                raise DataError(f"{e}; fmnist finds this copy first: replace it with the official files, "
                                f"or fetch them elsewhere with `fmnist download --data-dir DIR`") from None


# ----------------------------------------------------------------------------- tensors


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
    end takes the rest of that epoch and the start of the next, like the post's next_batch."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        self.pos = 0
        self.perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
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
