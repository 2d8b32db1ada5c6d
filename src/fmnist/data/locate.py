"""Where the four Fashion-MNIST files are: the folders searched in turn, the files' sizes and
checksums, and the hardened download (bounded in size and time, verified, written atomically).

    fmnist download [--data-dir DIR]
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fmnist.data.idx import DataError, IdxFile, _read_payload, gunzip_stream
from fmnist.io import share_as_umask_allows

# The authors' bucket over TLS (its website endpoint, which their README links, is HTTP only).
MIRROR = "https://fashion-mnist.s3.eu-central-1.amazonaws.com/"
DOWNLOAD_SECONDS = 600.0  # most time one file may take (the largest, 26 MB, at 44 KB/s)
READ_SECONDS = 30.0  # most time the mirror may stay silent
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


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


