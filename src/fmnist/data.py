"""Fashion-MNIST on disk and in memory: IDX parsing with validation, locating and downloading
the four files, and the in-memory tensors (train, validation and test splits) that training
slices its batches from.

    fmnist download [--data-dir DIR]
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator
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

# The authors' bucket over TLS (its website endpoint, which their README links, is HTTP only).
MIRROR = "https://fashion-mnist.s3.eu-central-1.amazonaws.com/"
DOWNLOAD_SECONDS = 600.0  # most time one file may take (the largest, 26 MB, at 44 KB/s)
READ_SECONDS = 30.0  # most time the mirror may stay silent
GUNZIP_PIECE = 1 << 20  # bytes decompressed at a time
MAX_IDX_BYTES = 1 << 32  # an IDX payload larger than 4 GiB is refused from its header
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


def gunzip_stream(chunks: Iterable[bytes], origin: str) -> Iterator[bytes]:
    """The decompressed bytes of gzip data (one member or several, as gzip reads them) arriving
    in `chunks`, in pieces of at most GUNZIP_PIECE bytes, decompressed only as they are taken:
    a consumer that stops early bounds the time and memory a gzip bomb costs, whatever its ratio."""
    decompressor, fed = zlib.decompressobj(wbits=31), False
    try:
        for chunk in chunks:
            while chunk:
                fed = True
                piece = decompressor.decompress(chunk, GUNZIP_PIECE)
                if piece:
                    yield piece
                if decompressor.eof:  # a member ended; another may follow
                    chunk, decompressor, fed = decompressor.unused_data, zlib.decompressobj(wbits=31), False
                else:
                    chunk = decompressor.unconsumed_tail
            while fed and not decompressor.eof and (piece := decompressor.decompress(b"", GUNZIP_PIECE)):
                yield piece  # output held back by the piece limit
    except zlib.error as e:
        raise DataError(f"{origin}: corrupt or truncated gzip data ({e})") from None
    if fed and not decompressor.eof:
        raise DataError(f"{origin}: corrupt or truncated gzip data (it ends in the middle of a stream)")


def _file_chunks(f, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk


def _read_payload(path: Path) -> bytes:
    """The file's bytes, decompressed when it is gzip, read no further than its IDX header says
    the data goes (and never beyond MAX_IDX_BYTES): a gzip bomb or a huge file costs nothing
    more than its header."""
    try:
        with path.open("rb") as f:
            head = f.read(2)
            if not head:
                raise DataError(f"{path}: empty file")
            if head == _GZIP_MAGIC:
                f.seek(0)
                return _bounded_idx(gunzip_stream(_file_chunks(f), str(path)), f"{path}", gzipped=True)
            if path.suffix == ".gz":
                raise DataError(f"{path}: not a gzip file (named .gz but has no gzip header)")
            f.seek(0)
            return _bounded_idx(_file_chunks(f), str(path), gzipped=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not an IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _bounded_idx(pieces: Iterator[bytes], name: str, gzipped: bool) -> bytes:
    """The bytes of an IDX payload, taken from `pieces` up to the size its header declares plus
    one (so parse_idx sees trailing bytes), refusing a declared size over MAX_IDX_BYTES."""
    data, expected = bytearray(), None
    for piece in pieces:
        data += piece
        if expected is None:
            expected = idx_size(bytes(data[:20]), name)
            if expected is not None and expected > MAX_IDX_BYTES:
                raise DataError(f"{name}: header declares {expected:,} bytes of data, more than the "
                                f"limit of {MAX_IDX_BYTES:,}")
        if expected is not None and len(data) > expected:
            raise DataError(f"{name}: unexpected trailing bytes after the {expected:,} bytes its header declares")
    if not data:
        raise DataError(f"{name}: empty file" + (" (after gunzip)" if gzipped else ""))
    return bytes(data)


def idx_size(head: bytes, name: str = "<bytes>") -> int | None:
    """The total size in bytes an IDX header declares (header included), once `head` holds
    the whole header; None before. Sizes are Python integers: no dimensions overflow them."""
    if len(head) < 4:
        return None
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{name}: bad magic number 0x{head[:4].hex()} (not an IDX file)")
    dtype = _IDX_DTYPES.get(head[2])
    if dtype is None:
        raise DataError(f"{name}: unknown IDX element type 0x{head[2]:02x}")
    ndim = head[3]
    if not 1 <= ndim <= 4:
        raise DataError(f"{name}: unsupported number of dimensions {ndim}")
    header = 4 + 4 * ndim
    if len(head) < header:
        return None
    return header + math.prod(struct.unpack(f">{ndim}I", head[4:header])) * dtype.itemsize


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse an IDX payload (already decompressed), checking its header against its length."""
    expected = idx_size(raw, name)
    if expected is None:
        header = 4 + 4 * raw[3] if len(raw) >= 4 else 4
        raise DataError(f"{name}: truncated IDX header ({len(raw)} of {header} bytes)")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) < expected:
        raise DataError(
            f"{name}: truncated file: header says {dims} needing {expected} bytes, found {len(raw)}"
        )
    if len(raw) > expected:
        raise DataError(f"{name}: {len(raw) - expected} unexpected trailing bytes after the data")
    try:
        array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    except ValueError:  # an empty array whose other dimensions overflow numpy's index type
        raise DataError(f"{name}: IDX shape {dims} is too large for an array") from None
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


def _verify_gzip(chunks: Iterable[bytes], info: IdxFile, origin: str) -> None:
    """Check gzip data arriving in chunks against the known size and hash of its payload,
    decompressing no further than that size: memory and time stay bounded, bomb or not."""
    digest, size = hashlib.sha256(), 0
    for piece in gunzip_stream(chunks, origin):
        size += len(piece)
        if size > info.size:
            raise DataError(f"{origin}: decompresses to more than the expected {info.size:,} bytes")
        digest.update(piece)
    if size != info.size:
        raise DataError(f"{origin}: expected {info.size} bytes after gunzip, got {size}")
    if digest.hexdigest() != info.sha256:
        raise DataError(f"{origin}: checksum mismatch (sha256 {digest.hexdigest()[:16]}..., "
                        f"expected {info.sha256[:16]}...)")


def max_compressed_size(info: IdxFile) -> int:
    """The most bytes a gzip file of this payload can take: deflate's stored blocks add 5
    bytes per 64 KiB, the gzip header a few more."""
    return info.size + info.size // 1000 + 64 * 1024


def _network_reason(e: BaseException) -> str:
    """What went wrong with a download, in a few words."""
    if isinstance(e, http.client.IncompleteRead):
        return f"the connection closed after {len(e.partial):,} bytes of the body"
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    return str(getattr(e, "reason", None) or getattr(e, "strerror", None) or e or type(e).__name__)


def _fetch(url: str, dest: Path, info: IdxFile, progress: bool, timeout: float = DOWNLOAD_SECONDS) -> None:
    """Download url into dest atomically: a temporary file in the same folder, checked while
    it streams (size caps on both sides of gunzip, the hash, a deadline), then renamed. Every
    network failure is one DataError naming the URL; nothing is left behind."""
    from tqdm.auto import tqdm

    start = time.monotonic()
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        share_as_umask_allows(tmp)
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=min(READ_SECONDS, timeout)) as response:
                    declared = int(response.headers.get("Content-Length") or 0) or None
                    if declared is not None and declared > max_compressed_size(info):
                        raise DataError(f"cannot download {url}: it is {declared:,} bytes, more than a gzip "
                                        f"of {info.name} can take ({max_compressed_size(info):,})")
                    with tqdm(total=declared, unit="B", unit_scale=True, desc=info.name, disable=not progress) as bar:
                        chunks = _download_chunks(response, url, info, start + timeout, timeout, out, bar)
                        _verify_gzip(chunks, info, url)
            except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
                raise DataError(f"cannot download {url}: {_network_reason(e)}") from None
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download_chunks(response, url: str, info: IdxFile, deadline: float, timeout: float, out,
                     bar) -> Iterator[bytes]:
    """The body of a download, written to `out` as it comes: refused beyond the most a gzip of
    the payload can take, or when it is not all in by `deadline`."""
    cap, received = max_compressed_size(info), 0
    while chunk := response.read1(1 << 16):
        received += len(chunk)
        if received > cap:
            raise DataError(f"cannot download {url}: more than the {cap:,} bytes a gzip of {info.name} can take")
        if time.monotonic() > deadline:
            raise DataError(f"cannot download {url}: not finished within {timeout:g} s")
        out.write(chunk)
        bar.update(len(chunk))
        yield chunk


def download(
    data_dir: str | os.PathLike | None = None,
    mirror: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    timeout: float = DOWNLOAD_SECONDS,
) -> Path:
    """Fetch the four files into data_dir (default: the user cache), verifying each.

    A file already present with the right payload is kept. Without `data_dir`, data found
    where fmnist looks for it (`search_dirs`) is checked and kept, and nothing is fetched. The
    mirror defaults to $FMNIST_MIRROR or the official one (HTTPS). Each file must arrive
    within `timeout` seconds.
    """
    if data_dir is None:
        found = next((d for d in search_dirs() if _has_all(d)), None)
        if found is not None:
            verify_dir(found)
            log(f"Fashion-MNIST is already present in {found} (checked); nothing to download")
            return found
    target = Path(data_dir) if data_dir is not None else cache_dir()
    try:
        return fetch_into(target, mirror, progress, log, timeout)
    except DataError as e:
        elsewhere = next((d for d in search_dirs() if _has_all(d)), None)
        if elsewhere is None:
            raise
        raise DataError(f"{e}; the data is already in {elsewhere}, where fmnist finds it without --data-dir") from None


def fetch_into(target: Path, mirror: str | None = None, progress: bool = True, log: Callable[[str], None] = print,
               timeout: float = DOWNLOAD_SECONDS) -> Path:
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
                _fetch(mirror + info.name, dest, info, progress, timeout)
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
