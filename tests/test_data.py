import gzip
import hashlib
import http.server
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import fmnist_cli, write_dataset
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fmnist.cli import main
from fmnist.data import DataError, idx, load_idx, load_split, locate, one_hot, save_idx, splits


def gzip_bomb(start: bytes = b"", members: int = 100, zeros: int = 10_000_000) -> bytes:
    """gzip data of `members` members, each `zeros` zero bytes (about 10 KB compressed), after
    a first member holding `start`: 1 MB that would decompress to 1 GB."""
    member = gzip.compress(b"\0" * zeros, compresslevel=9)
    return gzip.compress(start) + member * members


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1" if code == 0x08 else array.dtype).tobytes()


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = tmp_path / ("x-idx3-ubyte.gz" if gz else "x-idx3-ubyte")
    save_idx(path, images)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    loaded = load_idx(path)
    assert loaded.dtype == np.uint8 and loaded.shape == (5, 28, 28)
    np.testing.assert_array_equal(loaded, images)


def test_load_idx_reads_big_endian_ints(tmp_path):
    values = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "ints").write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + values.astype(">i4").tobytes())
    np.testing.assert_array_equal(load_idx(tmp_path / "ints"), values)


MALFORMED = {
    "empty file": b"",
    "bad magic number": b"\x12\x34\x08\x03" + b"\0" * 12,
    "unknown IDX element type": bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 7]),
    "truncated file": idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-100],
    "truncated IDX header": bytes([0, 0, 8, 3, 0, 0]),
    "trailing bytes": idx_bytes(np.zeros((2,), np.uint8)) + b"xx",
}


@pytest.mark.parametrize("problem", list(MALFORMED))
def test_malformed_idx_names_file_and_problem(tmp_path, problem):
    path = tmp_path / "bad-ubyte"
    path.write_bytes(MALFORMED[problem])
    with pytest.raises(DataError) as info:
        load_idx(path)
    message = str(info.value)
    assert str(path) in message and problem in message
    assert "\n" not in message


def test_sizes_do_not_overflow(tmp_path):
    """Dimensions of 65536^4 need 2^64 bytes: said as such, not wrapped around into nonsense."""
    header = bytes([0, 0, 8, 4]) + struct.pack(">4I", *[65536] * 4)
    with pytest.raises(DataError, match=f"needing {2**64 + 20} bytes"):
        idx.parse_idx(header + b"\0" * 10, "huge")
    path = tmp_path / "huge-ubyte.gz"
    path.write_bytes(gzip.compress(header + b"\0" * 10))
    with pytest.raises(DataError, match="more than the limit of 4,294,967,296"):
        load_idx(path)


def test_a_gzip_bomb_is_read_no_further_than_its_header_says(tmp_path):
    """1 MB of gzip that would be 1 GB: its header says 9 bytes, so reading stops there."""
    path = tmp_path / "bomb-idx1-ubyte.gz"
    path.write_bytes(gzip_bomb(idx_bytes(np.zeros(9, np.uint8)), members=100))
    with pytest.raises(DataError, match="unexpected trailing bytes after the 17 bytes its header declares"):
        load_idx(path)


@st.composite
def idx_like(draw) -> bytes:
    """Bytes that look like IDX to a varying degree: any header fields, dimensions near the
    payload's real length or wildly off, payloads short or long, sometimes gzipped."""
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x42]))
    ndim = draw(st.integers(0, 6))
    dims = draw(st.lists(st.one_of(st.integers(0, 6), st.integers(0, 2**32 - 1)), min_size=ndim, max_size=ndim))
    header = bytes([0, 0, code, ndim]) + struct.pack(f">{ndim}I", *dims)
    head = draw(st.sampled_from([header, header[:draw(st.integers(0, len(header)))], b"\x12\x34" + header[2:]]))
    data = head + draw(st.binary(max_size=300))
    return gzip.compress(data) if draw(st.booleans()) else data


@settings(max_examples=200, deadline=None)
@given(raw=st.one_of(idx_like(), st.binary(max_size=64)))
@example(raw=bytes([0, 0, 8, 4]) + struct.pack(">4I", 0, 2**32 - 1, 2**32 - 1, 2**32 - 1))  # empty, overflowing shape
def test_any_bytes_parse_or_give_one_clear_error(raw):
    try:
        array = idx.parse_idx(raw, "x.idx")
    except DataError as e:
        assert str(e).startswith("x.idx: ") and "\n" not in str(e)
        return
    assert array.ndim == raw[3] and array.size * array.itemsize == len(raw) - 4 - 4 * raw[3]


@settings(max_examples=100, deadline=None)
@given(raw=st.one_of(idx_like(), st.binary(max_size=64)))
@example(raw=bytes([0, 0, 8, 4]) + struct.pack(">4I", 0, 2**32 - 1, 2**32 - 1, 2**32 - 1))  # empty, overflowing shape
def test_any_file_loads_or_gives_one_clear_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("idx") / "file-ubyte"
    path.write_bytes(raw)
    try:
        load_idx(path)
    except DataError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)


def test_not_gzip_and_corrupt_gzip(tmp_path):
    fake = tmp_path / "a.gz"
    fake.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="not a gzip file"):
        load_idx(fake)
    broken = tmp_path / "b.gz"
    broken.write_bytes(gzip.compress(idx_bytes(np.zeros((9, 28, 28), np.uint8)))[:-30])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        load_idx(broken)


def test_load_split_validates_counts_and_labels(tmp_path):
    d = write_dataset(tmp_path / "d", n_train=50, n_test=20)
    images, labels = load_split("train", d)
    assert images.shape == (50, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (50,) and labels.dtype == np.int64

    save_idx(d / "t10k-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(DataError, match="count mismatch: 19 labels for 20 images"):
        load_split("test", d)
    save_idx(d / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, np.uint8))
    with pytest.raises(DataError, match="label 10 at index 0 is outside 0..9"):
        load_split("test", d)
    save_idx(d / "t10k-images-idx3-ubyte.gz", np.zeros((20, 28, 27), np.uint8))
    with pytest.raises(DataError, match="expected 28x28 images"):
        load_split("test", d)
    with pytest.raises(DataError, match="unknown split"):
        load_split("validation", d)


def test_raw_files_are_found_too(tmp_path):
    d = write_dataset(tmp_path / "raw", n_train=30, n_test=10, gz=False)
    assert load_split("test", d)[0].shape == (10, 28, 28)


def test_one_hot():
    encoded = one_hot([0, 3, 9])
    assert encoded.shape == (3, 10) and encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded.argmax(1), [0, 3, 9])
    assert encoded.sum() == 3
    with pytest.raises(ValueError):
        one_hot([10])


def test_to_tensor_normalises_once():
    raw = np.array([[[0, 255] * 14] * 28], dtype=np.uint8)
    x = splits.to_tensor(raw, mean=0.5, std=0.25)
    assert x.shape == (1, 1, 28, 28) and x.dtype == torch.float32
    assert x.min().item() == pytest.approx(-2.0) and x.max().item() == pytest.approx(2.0)


# ----------------------------------------------------------------------------- locating


def test_search_order(tmp_path, monkeypatch):
    env_dir = write_dataset(tmp_path / "env", 20, 10, seed=1)
    post_dir = write_dataset(tmp_path / "work" / "data" / "fashion", 20, 10, seed=2)
    cache = write_dataset(tmp_path / "cache" / "fmnist", 20, 10, seed=3)
    debian = write_dataset(tmp_path / "debian", 20, 10, seed=4)
    explicit = write_dataset(tmp_path / "explicit", 20, 10, seed=5)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(locate, "DEBIAN_DIR", debian)
    monkeypatch.setenv("FMNIST_DATA", str(env_dir))

    assert locate.find_data_dir(explicit) == explicit
    assert locate.find_data_dir() == env_dir
    monkeypatch.delenv("FMNIST_DATA")
    assert locate.find_data_dir() == Path("data/fashion")
    shutil.rmtree(post_dir)
    assert locate.find_data_dir() == cache
    shutil.rmtree(cache)
    assert locate.find_data_dir() == debian
    shutil.rmtree(debian)
    with pytest.raises(DataError, match="not found"):
        locate.find_data_dir(download_missing=False)


# ----------------------------------------------------------------------------- downloading


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving the four files; tests spoil files in it."""
    root = tmp_path / "mirror"
    root.mkdir()
    rng = np.random.default_rng(7)
    splits = {}
    # Tiny stand-ins for the four files, with their known sizes and hashes patched in, so the
    # test exercises the real verification code on a few KB instead of 30 MB.
    for split, files in locate.SPLITS.items():
        entries = []
        for info in files:
            shape = (6, 28, 28) if "images" in info.name else (6,)
            payload = idx_bytes(rng.integers(0, 10, shape).astype(np.uint8))
            (root / info.name).write_bytes(gzip.compress(payload))
            entries.append(idx.IdxFile(info.name, len(payload), hashlib.sha256(payload).hexdigest()))
        splits[split] = tuple(entries)
    monkeypatch.setattr(locate, "SPLITS", splits)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_good_files(tmp_path, mirror):
    root, url = mirror
    dest = tmp_path / "dest"
    locate.download(dest, mirror=url, progress=False, log=lambda *_: None)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in root.iterdir())
    assert load_split("train", dest)[0].shape == (6, 28, 28)


@pytest.mark.parametrize("spoil", ["truncated", "corrupted", "missing"])
def test_download_rejects_bad_files_and_leaves_nothing(tmp_path, mirror, spoil):
    root, url = mirror
    target = root / "train-labels-idx1-ubyte.gz"
    if spoil == "truncated":
        target.write_bytes(target.read_bytes()[:-8])
    elif spoil == "corrupted":
        payload = bytearray(gzip.decompress(target.read_bytes()))
        payload[-1] ^= 0xFF
        target.write_bytes(gzip.compress(bytes(payload)))
    else:
        target.unlink()
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as info:
        locate.download(dest, mirror=url, progress=False, log=lambda *_: None)
    assert "train-labels" in str(info.value)
    assert not (dest / target.name).exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")], "a partial file was left"


def test_download_keeps_verified_files(tmp_path, mirror):
    _, url = mirror
    dest = tmp_path / "dest"
    locate.download(dest, mirror=url, progress=False, log=lambda *_: None)
    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    locate.download(dest, mirror=url, progress=False, log=lambda *_: None)
    assert before == {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}


def test_download_cli_unreachable_mirror_is_one_line(tmp_path, capsys, mirror):
    code = main(["download", "--data-dir", str(tmp_path / "d"), "--mirror", "http://127.0.0.1:9/", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fmnist: error: cannot download http://127.0.0.1:9/")
    assert err.count("\n") == 1 and "Traceback" not in err


class HostileHandler(http.server.BaseHTTPRequestHandler):
    """A mirror that serves every file as `mode` says: a gzip bomb, an endless body, a reset
    connection or a trickle."""

    mode = "bomb"
    bomb = b""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        if self.mode == "bomb":
            self.send_header("Content-Length", str(len(self.bomb)))
            self.end_headers()
            self.wfile.write(self.bomb)
            return
        self.send_header("Connection", "close")  # a body without a length: it ends when the server says
        self.end_headers()
        try:
            if self.mode == "endless":  # a gzip header, then empty deflate blocks forever: no output at all
                self.wfile.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
                while True:
                    self.wfile.write(b"\x00\x00\x00\xff\xff" * 10_000)
            elif self.mode == "reset":
                self.wfile.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            elif self.mode == "trickle":  # a valid start, five bytes at a time
                self.wfile.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
                while True:
                    self.wfile.write(b"\x00\x00\x00\xff\xff")
                    self.wfile.flush()
                    time.sleep(0.05)
        except OSError:
            pass


@pytest.fixture
def hostile_mirror():
    """A local HTTP server on 127.0.0.1 whose mode each test sets."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("mode, message", [
    ("bomb", "decompresses to more than the expected 4,720 bytes"),
    ("endless", "bytes a gzip of train-images-idx3-ubyte.gz can take"),
    ("reset", "Connection reset by peer"),
    ("trickle", "not finished within 1 s"),
])
def test_hostile_mirror_gives_one_line_and_leaves_nothing(tmp_path, mirror, hostile_mirror, monkeypatch, mode,
                                                          message):
    server, url = hostile_mirror
    monkeypatch.setattr(HostileHandler, "mode", mode)
    monkeypatch.setattr(HostileHandler, "bomb", gzip_bomb(members=5))  # 50 KB: under the size cap
    dest = tmp_path / "dest"
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        locate.download(dest, mirror=url, progress=False, log=lambda *_: None, timeout=1.0)
    text = str(info.value)
    assert text.startswith(f"cannot download {url}train-images") or text.startswith(f"{url}train-images"), text
    assert message in text and "\n" not in text
    assert not dest.exists(), "a file or the folder the download made was left behind"
    assert time.monotonic() - start < 20


def test_download_bomb_from_the_command_line_keeps_memory_bounded(tmp_path, hostile_mirror, monkeypatch):
    """The real file sizes: a 1,000:1 bomb stops at train-images' 47 MB; the process stays small."""
    server, url = hostile_mirror
    monkeypatch.setattr(HostileHandler, "bomb", gzip_bomb(members=100))  # 1 MB of gzip, 1 GB of zeros
    code = ("import re, sys\nfrom fmnist.cli import main\nstatus = main(sys.argv[1:])\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\nsys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, "download", "--data-dir", str(tmp_path / "d"), "--mirror", url,
                             "--quiet"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "decompresses to more than the expected 47,040,016 bytes" in result.stderr
    assert int(result.stdout.split()[-1]) < 700_000  # KiB; the whole payload in memory would be 1 GB
    assert not (tmp_path / "d").exists()


def test_download_says_where_the_data_already_is_and_fetches_nothing(tmp_path, mirror, monkeypatch, capsys):
    """Offline, with the data found where fmnist looks: its files are checked, nothing fetched."""
    root, _ = mirror
    monkeypatch.setenv("FMNIST_DATA", str(root))
    monkeypatch.chdir(tmp_path)
    assert main(["download", "--mirror", "http://127.0.0.1:9/", "--quiet"]) == 0
    assert capsys.readouterr().out == f"Fashion-MNIST is already present in {root} (checked); nothing to download\n"
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01\x05"))
    assert main(["download", "--mirror", "http://127.0.0.1:9/", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t10k-labels-idx1-ubyte.gz: expected" in err and "fmnist finds this copy first" in err


def offline_env(tmp_path, **extra) -> dict:
    """An environment whose mirror is unreachable and whose user cache is empty."""
    env = {k: v for k, v in os.environ.items() if k not in ("FMNIST_DATA", "FMNIST_MIRROR")}
    return env | {"FMNIST_MIRROR": "http://127.0.0.1:9/", "XDG_CACHE_HOME": str(tmp_path / "cache")} | extra


def test_train_with_an_empty_data_dir_says_what_is_missing_and_what_to_do(tmp_path, shared_synthetic_dir):
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    env = offline_env(tmp_path, FMNIST_DATA=str(shared_synthetic_dir))
    for folder, problem in ((empty, "no Fashion-MNIST files there"), (missing, "no such folder")):
        result = fmnist_cli("train", "--data-dir", folder, "--out", tmp_path / "run", cwd=tmp_path, env=env)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"fmnist: error: {folder}: {problem}, and downloading them failed "
                                        "(cannot download http://127.0.0.1:9/train-images-idx3-ubyte.gz")
        assert "copy the four IDX files (train-images-idx3-ubyte.gz, " in result.stderr
        assert result.stderr.endswith(f"or leave out --data-dir to use the copy in {shared_synthetic_dir}\n")
    assert not missing.exists() and list(empty.iterdir()) == [] and not (tmp_path / "run").exists()


def test_download_command_with_the_real_data_installed_offline(data_dir, tmp_path):
    result = fmnist_cli("download", cwd=tmp_path, env=offline_env(tmp_path))
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"Fashion-MNIST is already present in {data_dir} (checked); nothing to download\n"


def test_real_dataset_payload_matches_known_hashes(data_dir):
    """The files found on this machine are the real Fashion-MNIST (the checks `download` uses)."""
    for files in locate.SPLITS.values():
        for info in files:
            locate._verify_payload(idx._read_payload(locate._file_in(data_dir, info.name)), info, info.name)
    images, labels = load_split("test", data_dir)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [1000] * 10
