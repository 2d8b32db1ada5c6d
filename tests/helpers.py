"""Helpers shared by the test modules (`from helpers import ...`; pytest puts tests/ on sys.path):
small synthetic data and configs, the `fmnist` command in its own process, run-folder
comparisons, and a real `fmnist serve` process. Fixtures live in conftest.py."""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from fmnist.config import TrainConfig
from fmnist.data import SPLITS, save_idx
from fmnist.run import EndRecord, EvalRecord, LossRecord, RunDir, record_from_json

# ----------------------------------------------------------------------------- data and configs


def as_run(run_dir) -> RunDir:
    """A RunDir for a path or a RunDir."""
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def write_dataset(directory: Path, n_train: int = 640, n_test: int = 160, seed: int = 0, gz: bool = True) -> Path:
    """A small synthetic Fashion-MNIST folder: the four IDX files with random contents, each
    class drawn as a brighter band at its own rows so that a network can learn it."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 220
        images_info, labels_info = SPLITS[split]
        for info, array in ((images_info, images), (labels_info, labels)):
            save_idx(directory / (info.name if gz else info.name.removesuffix(".gz")), array)
    return directory


def small_config(data_dir, out, **overrides) -> TrainConfig:
    """A few steps of small batches on a synthetic dataset, without plots."""
    values = dict(steps=12, batch_size=32, val_size=64, log_every=5, data_dir=str(data_dir), out=str(out), plots=False)
    return TrainConfig(**(values | overrides))


def quiet(*_) -> None:
    """A `log` that says nothing."""


def untrained_run(directory: Path, model: str = "post") -> RunDir:
    """A run folder holding a freshly initialised network as its model: for tests of the
    machinery around a model (serving, loading) that need no accuracy and no data."""
    from fmnist.data import CLASS_NAMES, Normalization
    from fmnist.run import ModelMeta, save_model

    torch.manual_seed(0)
    meta = ModelMeta(model, {"keep_prob": 0.75} if model.startswith("post") else {}, list(CLASS_NAMES),
                     Normalization())
    run = RunDir(directory)
    run.path.mkdir(parents=True, exist_ok=True)
    save_model(run, meta.build(), meta)
    return run


# ----------------------------------------------------------------------------- the command


def fmnist_cli(*args, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m fmnist ARGS` in its own process (in `env`, when given); its exit status and
    output."""
    return subprocess.run([sys.executable, "-m", "fmnist", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def as_flags(values: dict) -> list[str]:
    """Config values as `fmnist train` flags: {"batch_size": 32, "plots": False} ->
    ["--batch-size", "32", "--no-plots"]."""
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return flags


def losses_written(run: RunDir) -> int:
    """The loss records in the metrics of a run still training (a line being written is not
    counted yet)."""
    try:
        text = run.metrics_path.read_text()
    except FileNotFoundError:
        return 0
    complete = text.splitlines()[: text.count("\n")]
    return sum(isinstance(record_from_json(json.loads(line)), LossRecord) for line in complete)


def signal_after(args, run_dir, losses: int, sig, log_path: Path, timeout=300) -> tuple[int, str]:
    """Start `python -m fmnist <args>`, send `sig` once the run in `run_dir` has written
    `losses` loss records; the exit status and the output."""
    run = as_run(run_dir)
    with open(log_path, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "fmnist", *args], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if losses_written(run) >= losses:
                process.send_signal(sig)
                break
            time.sleep(0.01)
        process.wait(timeout=timeout)
    return process.returncode, log_path.read_text()


# ----------------------------------------------------------------------------- run folders


def weights(run_dir) -> dict[str, torch.Tensor]:
    """The saved weights (model.safetensors) of a run folder."""
    return load_file(as_run(run_dir).weights_path)


def untimed_metrics(run_dir) -> list:
    """A run's metrics records with the wall-clock times zeroed: what two runs of the same
    config must agree on."""
    records = as_run(run_dir).read_metrics()
    return [dataclasses.replace(r, train_seconds=0.0, eval_seconds=0.0) if isinstance(r, EvalRecord)
            else dataclasses.replace(r, train_seconds=0.0) if isinstance(r, EndRecord) else r
            for r in records]


def assert_same_run(a, b) -> None:
    """Bit-identical weights, and the same metrics record for record (bar the wall-clock time)."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert untimed_metrics(a) == untimed_metrics(b)


# ----------------------------------------------------------------------------- pictures


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 30_000) -> bytes:
    """A real side x side 1-bit PNG of zeros: about 110 KB that decode to ~900 megapixels."""
    chunk = png_chunk
    compressor = zlib.compressobj(9)
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _small_picture(fmt: str) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


# Crafted files that cost a decoder time per byte rather than per pixel, padded to `size` bytes.

def png_of_private_chunks(size: int) -> bytes:
    """A 28x28 PNG with empty private chunks between its header and its pixels."""
    picture, empty = _small_picture("PNG"), png_chunk(b"prVt", b"")
    header = 8 + 25  # signature, IHDR
    return picture[:header] + empty * ((size - len(picture)) // len(empty)) + picture[header:]


def jpeg_of_empty_segments(size: int) -> bytes:
    """A 28x28 JPEG with empty APP1 segments before its frame header."""
    picture = _small_picture("JPEG")
    return picture[:2] + b"\xff\xe1\x00\x02" * ((size - len(picture)) // 4) + picture[2:]


def bmp_rle_noops(size: int, side: int = 16) -> bytes:
    """A side x side 8-bit RLE BMP whose pixel data is end-of-line codes that draw nothing."""
    pixels = b"\x00\x00" * ((size - 54 - 1024 - 2) // 2) + b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def multipart_of_parts(size: int, boundary: str) -> bytes:
    """A multipart body of tiny fields, as many as fit in `size` bytes."""
    part, end = f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nv\r\n".encode(), f"--{boundary}--\r\n".encode()
    return part * ((size - len(end)) // len(part)) + end


def picture_bytes():
    """A Hypothesis strategy for files a user might upload, honest or not: small pictures of any
    mode and size in each supported format (and TIFF), then truncated, with bytes flipped or
    garbage inserted; and plain random bytes."""
    from hypothesis import strategies as st

    @st.composite
    def picture(draw) -> bytes:
        mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "LA", "I;16"]))
        fmt = draw(st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]))
        width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
        seed = draw(st.integers(0, 2**32 - 1))
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA")
        image = image.convert("RGB").convert("P") if mode == "P" else image.convert(mode if mode != "I;16" else "I")
        if mode == "I;16":
            image = image.convert("I;16")
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt)
        except (OSError, ValueError, KeyError):  # a mode this format cannot hold
            image.convert("RGB").save(buffer, format=fmt if fmt != "GIF" else "PNG")
        return buffer.getvalue()

    @st.composite
    def spoiled(draw) -> bytes:
        data = bytearray(draw(picture()))
        for _ in range(draw(st.integers(0, 4))):
            at = draw(st.integers(0, len(data) - 1))
            change = draw(st.sampled_from(["flip", "cut", "insert"]))
            if change == "flip":
                data[at] ^= draw(st.integers(1, 255))
            elif change == "cut":
                del data[at:]
                if not data:
                    break
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=64))
        return bytes(data)

    return st.one_of(picture(), spoiled(), st.binary(max_size=512))


# ----------------------------------------------------------------------------- processes on ports


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(address, path) -> tuple[int, dict, bytes]:
    """GET `path` from (host, port, ...): the status, headers and body."""
    connection = http.client.HTTPConnection(*address[:2], timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@contextmanager
def running_server(run_dir, *flags: str):
    """`fmnist serve` in its own process on a free port; yields (host, port, process)."""
    for _ in range(3):  # another process may take the free port before the server binds it
        port = free_port()
        log = io.BytesIO()
        process = subprocess.Popen(
            [sys.executable, "-m", "fmnist", "serve", "--model", str(run_dir), "--port", str(port),
             "--no-access-log", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if get(("127.0.0.1", port), "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        if process.poll() is None:
            break
        log.write(process.stdout.read())
    else:
        raise RuntimeError(f"server did not start:\n{log.getvalue().decode(errors='replace')}")
    try:
        yield "127.0.0.1", port, process
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()


# ----------------------------------------------------------------------------- photos


def ground(height: int, width: int, colour=(235, 235, 235), gradient: float = 0.0) -> np.ndarray:
    """A uniform ground (H, W, 3), its brightness changing by `gradient` from left to right."""
    light = 1 + gradient * (np.linspace(-0.5, 0.5, width, dtype=np.float32))
    return np.asarray(colour, np.float32) * light[None, :, None] * np.ones((height, 1, 1), np.float32)


def wood(height: int, width: int, colour=(150, 100, 60)) -> np.ndarray:
    """Brown stripes along a wandering grain."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = np.sin(2 * np.pi * (y + 8 * np.sin(x / 40)) / 23)
    return np.asarray(colour, np.float32) * (1 + 0.12 * stripes)[..., None]


def render_photo(intensity: np.ndarray, base: np.ndarray, ink=(30, 30, 30), scale: int = 8,
                 top: int = 40, left: int = 60, noise: float = 2.0) -> Image.Image:
    """A 28x28 light-on-black intensity as a photo: `ink` over `base` with the intensity as its
    density, enlarged `scale` times, its frame's corner at (top, left) (it may leave the
    picture), with sensor noise."""
    side = 28 * scale
    t = np.asarray(Image.fromarray(intensity).resize((side, side), Image.Resampling.BICUBIC), np.float32)
    t = np.clip(t / 255, 0, 1)
    h, w = base.shape[:2]
    layer = np.zeros((h, w), np.float32)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, h), min(left + side, w)
    layer[y0:y1, x0:x1] = t[y0 - top : y1 - top, x0 - left : x1 - left]
    photo = base * (1 - layer[..., None]) + np.asarray(ink, np.float32) * layer[..., None]
    photo += np.random.default_rng(0).normal(0, noise, (h, w, 1))
    return Image.fromarray(np.clip(photo + 0.5, 0, 255).astype(np.uint8), "RGB")


BOUNDARY = "fmnistboundary"


def post_image(address, data: bytes, path: str) -> tuple[int, dict]:
    """POST a picture to the service as the web page does (multipart field `file`); (status, JSON)."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    connection = http.client.HTTPConnection(*address[:2], timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()
