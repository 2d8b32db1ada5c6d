"""Preprocessing of pictures, the predict API and `fmnist predict`."""

from __future__ import annotations

import io
import json
import os
import shutil
import time

import numpy as np
import pytest
from helpers import bomb_png
from PIL import Image

from fmnist.cli import main
from fmnist.data import CLASS_NAMES, load_split, save_idx
from fmnist.inference.decode import ImageError, ImageTooLarge, UnsupportedImage, open_image
from fmnist.inference.photo import prepare_image
from fmnist.inference.predictor import load_model
from fmnist.run import RunDir


def render_photo(image: np.ndarray, rng: np.random.Generator, quality: int = 80) -> bytes:
    """A 28x28 test image as a photo would show it: a dark object on a white, slightly noisy,
    larger, non-square canvas, enlarged 4-8x, off-centre, JPEG-compressed."""
    scale = int(rng.integers(4, 9))
    side = 28 * scale
    obj = np.asarray(Image.fromarray(255 - image).resize((side, side), Image.Resampling.BICUBIC))
    width, height = 2 * side + int(rng.integers(0, 80)), side * 3 // 2 + int(rng.integers(0, 60))
    paper = rng.integers(235, 256) + rng.normal(0, 2, (height, width))
    canvas = np.clip(paper, 0, 255).astype(np.uint8)
    x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    canvas[y : y + side, x : x + side] = np.minimum(canvas[y : y + side, x : x + side], obj)
    buffer = io.BytesIO()
    Image.fromarray(canvas).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def object_box(image: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def wide_rectangle_picture(light_background: bool = True) -> np.ndarray:
    """A 40x20 grey rectangle, off-centre on a 300x200 canvas."""
    canvas = np.full((200, 300), 250 if light_background else 5, dtype=np.uint8)
    canvas[30:50, 200:240] = 40 if light_background else 215
    return canvas


# ----------------------------------------------------------------------------- preprocessing


def test_prepare_image_crops_scales_centres_and_inverts():
    out = prepare_image(wide_rectangle_picture())
    assert out.shape == (28, 28) and out.dtype == np.uint8
    top, bottom, left, right = object_box(out > 0)
    assert (left, right) == (0, 28)  # the longest side fills the width
    assert 13 <= bottom - top <= 15  # aspect ratio 2:1 kept
    assert abs((top + bottom) / 2 - 14) <= 1  # centred vertically
    assert out[14, 14] >= 250 and out[0, 0] == 0  # light object on black, levels stretched


def test_prepare_image_ignores_polarity_and_colour():
    dark_on_light = prepare_image(wide_rectangle_picture(light_background=True))
    light_on_dark = prepare_image(wide_rectangle_picture(light_background=False))
    coloured = np.stack([wide_rectangle_picture()] * 3, axis=-1)
    coloured[..., 0] //= 2  # a tinted photo
    assert np.abs(dark_on_light.astype(int) - light_on_dark).max() <= 2
    assert np.abs(prepare_image(coloured).astype(int) - dark_on_light).mean() < 3


def test_prepare_image_applies_exif_orientation():
    image = Image.fromarray(wide_rectangle_picture())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rotated = open_image(encode(image, "JPEG", exif=exif.tobytes()))
    top, bottom, left, right = object_box(prepare_image(rotated) > 30)
    assert bottom - top == 28 and right - left < 18  # the wide object now stands upright


def test_prepare_image_puts_transparency_on_white():
    rgba = np.zeros((60, 90, 4), dtype=np.uint8)  # fully transparent...
    rgba[20:30, 10:50] = (30, 30, 30, 255)  # ...but for an opaque dark 40x10 bar
    out = prepare_image(open_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    top, bottom, left, right = object_box(out > 0)
    assert out[14, 14] >= 250 and out[0, 0] == 0 and (left, right) == (0, 28) and bottom - top <= 9


def test_prepare_image_keeps_fashion_mnist_images(data_dir):
    images, _ = load_split("test", data_dir)
    prepared = np.stack([prepare_image(image) for image in images[:200]])
    # The dataset was made this way: preparing it again changes little.
    assert np.abs(prepared.astype(int) - images[:200]).mean() < 20


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF"])
def test_every_supported_format_decodes(fmt):
    image = Image.fromarray(wide_rectangle_picture()).convert("RGB")
    out = prepare_image(open_image(encode(image, fmt), f"x.{fmt.lower()}"))
    assert out.shape == (28, 28) and out.max() >= 200


def test_open_image_refuses_bad_input():
    with pytest.raises(UnsupportedImage):
        open_image(b"this is text, not a picture", "notes.txt")
    with pytest.raises(UnsupportedImage):  # a real image, in a format we do not accept
        open_image(encode(Image.new("L", (8, 8)), "TIFF"), "x.tiff")
    with pytest.raises(ImageError, match="empty"):
        open_image(b"", "empty.png")
    png = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt"):
        open_image(png[: len(png) // 2], "half.png")


def test_decompression_bomb_is_refused_from_its_header():
    bomb = bomb_png()
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLarge, match="more than the limit of 25,000,000 pixels"):
        open_image(bomb, "bomb.png")
    smaller = bomb_png(6000)  # under Pillow's own limit, over ours
    with pytest.raises(ImageTooLarge, match="6000x6000 pixels"):
        open_image(smaller, "bomb.png")


# ----------------------------------------------------------------------------- the model


def test_predict_api_takes_pil_images_and_arrays(trained_run, data_dir):
    images, _ = load_split("test", data_dir)
    predictor = load_model(trained_run)
    result = predictor.predict([Image.fromarray(255 - images[0]), images[1:4]], top_k=4)
    entries = result["predictions"]
    assert len(entries) == 4  # one picture plus a batch of three
    for entry in entries:
        probabilities = [t["probability"] for t in entry["top"]]
        assert len(entry["top"]) == 4 and probabilities == sorted(probabilities, reverse=True)
        assert all(CLASS_NAMES[t["index"]] == t["label"] for t in entry["top"])
    # Prepared arrays go to the model as they are: same answer as the raw probabilities.
    expected = predictor.probabilities(images[1:4]).argmax(1)
    assert [e["top"][0]["index"] for e in entries[1:]] == expected.tolist()


def photo_accuracy(predictor, images, labels, seed=0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    photos = np.stack([prepare_image(open_image(render_photo(image, rng))) for image in images])
    plain = (predictor.probabilities(images).argmax(1) == labels).mean()
    return float(plain), float((predictor.probabilities(photos).argmax(1) == labels).mean())


def test_photos_of_test_images_classify_nearly_as_well(trained_run, data_dir):
    images, labels = load_split("test", data_dir)
    plain, photo = photo_accuracy(load_model(trained_run), images[:600], labels[:600])
    assert photo >= plain - 0.05, f"photo accuracy {photo:.3f} vs plain {plain:.3f}"


@pytest.mark.slow
def test_photos_of_all_test_images_within_three_points(trained_run, data_dir):
    images, labels = load_split("test", data_dir)
    plain, photo = photo_accuracy(load_model(trained_run), images, labels)
    print(f"plain test accuracy {plain:.4f}, as JPEG photos {photo:.4f}")
    assert photo >= plain - 0.03, f"photo accuracy {photo:.4f} vs plain {plain:.4f}"


# ----------------------------------------------------------------------------- the command


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_command_json_for_pictures_and_batches(trained_run, data_dir, tmp_path, capsys):
    images, labels = load_split("test", data_dir)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(render_photo(images[0], np.random.default_rng(1)))
    np.save(tmp_path / "batch.npy", images[:3])
    save_idx(tmp_path / "batch-idx3-ubyte.gz", images[3:5])
    code, out, err = run_cli(capsys, "predict", "--model", trained_run, photo, tmp_path / "batch.npy",
                             tmp_path / "batch-idx3-ubyte.gz", "--top-k", 2, "--json",
                             "--save-input", tmp_path / "seen")
    assert code == 0, err
    result = json.loads(out)
    files = [p["file"] for p in result["predictions"]]
    assert files == [str(photo)] + [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(3)] + \
        [f"{tmp_path / 'batch-idx3-ubyte.gz'}[{i}]" for i in range(2)]
    assert all(len(p["top"]) == 2 for p in result["predictions"])
    predicted = [p["top"][0]["index"] for p in result["predictions"][1:]]
    assert predicted == load_model(trained_run).probabilities(images[:5]).argmax(1).tolist()
    seen = np.asarray(Image.open(tmp_path / "seen" / "photo.png"))
    assert seen.shape == (28, 28) and np.array_equal(seen, prepare_image(open_image(photo)))
    assert len(list((tmp_path / "seen").glob("*.png"))) == 6


def test_predict_command_uses_latest_run_and_says_so(trained_run, data_dir, tmp_path, monkeypatch, capsys):
    for name in ("older", "newer"):
        run = RunDir(tmp_path / "runs" / name)
        shutil.copytree(trained_run, run.path)
        os.utime(run.meta_path, (time.time(), time.time() + (name == "newer")))
    images, _ = load_split("test", data_dir)
    Image.fromarray(images[0]).save(tmp_path / "x.png")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "predict", "x.png", "--top-k", 1)
    assert code == 0
    newer = os.path.join("runs", "newer")
    described = f"post, test accuracy {RunDir(newer).read_meta().test_accuracy:.2%}"
    assert err == f"fmnist: using {newer}, the most recent run under ./runs ({described}); choose another with --model RUN_DIR\n"
    assert out.splitlines()[0] == f"model: {newer} ({described})"
    assert out.splitlines()[1] == "x.png" and out.count("%") == 2


@pytest.mark.parametrize("content, message", [
    (encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)),
            "PNG")[:2000], "truncated or corrupt"),
    (b"hello", "not an image in a supported format"),
    (np.zeros((2, 5, 5), np.uint8), "expected images of shape"),
    (np.zeros((2, 28, 28), np.float32), "expected uint8 pixels"),
    (None, "file not found"),
    (encode(Image.new("RGB", (640, 480), (236, 230, 220)), "PNG"), "no object found"),
], ids=["truncated-png", "text", "npy-wrong-shape", "npy-float", "missing", "blank-canvas"])
def test_predict_command_bad_input_is_one_line(trained_run, tmp_path, capsys, content, message):
    path = tmp_path / ("bad.npy" if isinstance(content, np.ndarray) else "bad.png")
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_bytes(content)
    code, out, err = run_cli(capsys, "predict", "--model", trained_run, path)
    assert code == 2 and out == ""
    assert err.startswith("fmnist: error: ") and message in err and len(err.splitlines()) == 1


def test_predict_command_without_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "predict", "x.png")
    assert code == 2 and "no trained model under runs/" in err


def test_save_input_names_batch_images_by_index_and_says_where(tiny_run, tmp_path, capsys):
    """batch.npy[1] is seen/batch-1.png; the table and the JSON say where each input went."""
    np.save(tmp_path / "batch.npy", np.random.default_rng(0).integers(0, 255, (3, 28, 28), dtype=np.uint8))
    shoe = np.zeros((28, 28), np.uint8)
    shoe[14:22, 4:24] = 220  # a light object on black
    Image.fromarray(shoe).save(tmp_path / "shoe.png")
    seen = tmp_path / "seen"
    code, out, err = run_cli(capsys, "predict", "--model", tiny_run, tmp_path / "batch.npy", tmp_path / "shoe.png",
                             "--save-input", seen)
    assert code == 0, err
    expected = [seen / "batch-0.png", seen / "batch-1.png", seen / "batch-2.png", seen / "shoe.png"]
    assert sorted(seen.iterdir()) == sorted(expected)
    for path in expected:
        assert f"  (the model saw {path})" in out.splitlines()
    code, out, _ = run_cli(capsys, "predict", "--model", tiny_run, tmp_path / "batch.npy", "--json",
                           "--save-input", seen)
    entries = json.loads(out)["predictions"]
    assert [e["input_file"] for e in entries] == [str(p) for p in expected[:3]]
    assert np.array_equal(np.asarray(Image.open(expected[1])), np.load(tmp_path / "batch.npy")[1])


def test_a_folder_of_files_gets_an_answer_for_each_file_it_can(tiny_run, tmp_path, capsys):
    """One blank picture and one file that is no image among good ones: those two are reported on
    their own lines (an `error` entry in --json), the others answered, exit 0; only when no file
    can be answered does the command fail."""
    shoe = np.zeros((28, 28), np.uint8)
    shoe[14:22, 4:24] = 220
    Image.fromarray(shoe).save(tmp_path / "shoe.png")
    Image.new("RGB", (640, 480), (236, 230, 220)).save(tmp_path / "blank.png")
    (tmp_path / "notes.jpg").write_bytes(b"not a picture at all")
    np.save(tmp_path / "batch.npy", np.random.default_rng(0).integers(0, 255, (2, 28, 28), dtype=np.uint8))
    files = [tmp_path / "shoe.png", tmp_path / "blank.png", tmp_path / "notes.jpg", tmp_path / "batch.npy"]
    code, out, err = run_cli(capsys, "predict", "--model", tiny_run, *files, "--json")
    assert code == 0, err
    entries = json.loads(out)["predictions"]
    assert [e["file"] for e in entries] == [str(files[0]), str(files[1]), str(files[2]),
                                            f"{files[3]}[0]", f"{files[3]}[1]"]
    assert "no object found" in entries[1]["error"] and "top" not in entries[1]
    assert str(files[2]) in entries[2]["error"] and "top" not in entries[2]
    assert all(len(e["top"]) == 3 for e in entries[:1] + entries[3:])
    code, out, err = run_cli(capsys, "predict", "--model", tiny_run, *files)
    assert code == 0 and err.count("\n") <= 1  # at most the note saying which model
    assert f"{files[1]}\n  not answered: {files[1]}: no object found" in out
    code, out, err = run_cli(capsys, "predict", "--model", tiny_run, files[1], files[2])
    assert code == 2 and out == ""
    assert err.startswith("fmnist: error: none of the 2 files could be answered; the first: ") and err.count("\n") == 1
