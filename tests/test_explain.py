"""`fmnist explain` and `fmnist.explain`: attributions for every method, mirror-averaging models,
the command's pictures and JSON, its one-line errors, POST /v1/explain over HTTP, and the
faithfulness of the default method on a model trained on the real data."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import sys
import time

import numpy as np
import pytest
import torch
from helpers import png, post_image, quiet, running_server, small_config, write_dataset
from PIL import Image

pytest.importorskip("captum")

from fmnist import FmnistError  # noqa: E402
from fmnist.cli import main  # noqa: E402
from fmnist.data import CLASS_NAMES, FMNIST_MEAN, FMNIST_STD, Normalization, load_split, to_tensor  # noqa: E402
from fmnist.explain import DEFAULT_METHOD, METHODS, attribute, faithfulness, remove_top  # noqa: E402
from fmnist.inference.forward import predict_logits  # noqa: E402
from fmnist.inference.predictor import load_model  # noqa: E402
from fmnist.models import build_model  # noqa: E402
from fmnist.run import (  # noqa: E402
    ModelMeta,
    RunDir,
    save_model,  # noqa: E402
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A synthetic dataset (each class a bright band at its own rows) and the post's network
    trained on it for a few steps: it predicts the test set perfectly from the band."""
    from fmnist.training.loop import train

    root = tmp_path_factory.mktemp("explain")
    data = write_dataset(root / "fashion")
    train(small_config(data, root / "run", steps=30), progress=False, log=quiet)
    return data, root / "run"


@pytest.fixture(scope="module")
def mirror_run(tmp_path_factory):
    """An untrained `fast` network whose model.json asks for mirror averaging (tta); its
    classifier scaled up so that its logits differ by a few units, as a trained model's do."""
    torch.manual_seed(0)
    run = RunDir.create(tmp_path_factory.mktemp("mirror") / "run", "fast")
    meta = ModelMeta("fast", {}, list(CLASS_NAMES), Normalization(FMNIST_MEAN, FMNIST_STD), tta=True)
    model = build_model("fast").eval()
    with torch.no_grad():
        model.head.weight.mul_(100)
    save_model(run, model, meta)
    return run.path


def first_test_images(data, n: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_split("test", data)
    return images[:n], labels[:n]


def band(label: int) -> np.ndarray:
    """The pixels of the synthetic dataset's band for a class (helpers.write_dataset)."""
    mask = np.zeros((28, 28), bool)
    mask[2 + 2 * label : 4 + 2 * label, 4:24] = True
    return mask


# ----------------------------------------------------------------------------- attributions


@pytest.mark.parametrize("method", METHODS)
def test_every_method_finds_the_band_that_decides_the_class(synthetic, method):
    data, run = synthetic
    predictor = load_model(run)
    images, labels = first_test_images(data, 6)
    assert (predictor.probabilities(images).argmax(1) == labels).all()
    heatmaps = attribute(predictor, images, method)
    assert heatmaps.shape == (6, 28, 28) and heatmaps.dtype == np.float32 and np.isfinite(heatmaps).all()
    if method == "gradcam":
        assert heatmaps.min() >= 0
    # The 40 highest-attributed pixels lie mostly on the class's band of 40 pixels (the rest of
    # each image is noise that no class depends on).
    top = np.argsort(-heatmaps.reshape(6, -1), axis=1)[:, :40]
    on_band = np.mean([band(c).reshape(-1)[t].mean() for c, t in zip(labels, top, strict=True)])
    assert on_band >= (0.9 if method != "gradcam" else 0.5)


def test_target_by_name_index_or_per_image(synthetic):
    data, run = synthetic
    predictor = load_model(run)
    images, _ = first_test_images(data, 2)
    by_name = attribute(predictor, images, target="trouser")
    np.testing.assert_array_equal(by_name, attribute(predictor, images, target=1))
    np.testing.assert_array_equal(by_name, attribute(predictor, images, target=["Trouser", 1]))
    assert not np.allclose(by_name, attribute(predictor, images, target=2))
    for bad, message in (("Hat", "unknown class 'Hat'"), (10, "outside 0..9"), ([1], "1 targets for 2 images")):
        with pytest.raises(FmnistError, match=message):
            attribute(predictor, images, target=bad)
    with pytest.raises(FmnistError, match="unknown attribution method 'lime'; choose one of occlusion, ig, gradcam"):
        attribute(predictor, images, "lime")
    assert attribute(predictor, images[:0]).shape == (0, 28, 28)


def test_integrated_gradients_add_up_to_the_mirror_averaged_logit(mirror_run):
    """IG's completeness: each image's attributions sum to its logit minus the black image's,
    for the logits `predict` uses, the mean of the image's and its mirror's."""
    predictor = load_model(mirror_run)
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28)).astype(np.uint8)
    images[:, :, 14:] = 0  # an object on the left: its mirror image, on the right, scores otherwise
    heatmaps = attribute(predictor, images, "ig", target=4)
    x = to_tensor(images, FMNIST_MEAN, FMNIST_STD)
    black = torch.full_like(x[:1], predictor.meta.normalization.black)
    averaged = predict_logits(predictor.model, x, tta=True)[:, 4] - predict_logits(predictor.model, black, tta=True)[:, 4]
    plain = predict_logits(predictor.model, x)[:, 4] - predict_logits(predictor.model, black)[:, 4]
    sums = torch.as_tensor(heatmaps.sum((1, 2)), dtype=torch.float32)
    error = (sums - averaged).abs().mean()  # 50 integration steps: a few percent
    assert error < 0.05 * averaged.abs().mean()
    assert (sums - plain).abs().mean() > 3 * error  # not the plain network's logits


@pytest.mark.parametrize("method", METHODS)
def test_a_mirror_averaging_model_explains_the_mirror_image_as_the_mirrored_map(mirror_run, method):
    """The averaged network cannot tell an image from its mirror image, so neither can its
    attributions: the mirror's heatmap is the heatmap mirrored."""
    predictor = load_model(mirror_run)
    images = np.random.default_rng(1).integers(0, 256, (1, 28, 28)).astype(np.uint8)
    heatmaps = attribute(predictor, images, method, target=3)
    mirrored = attribute(predictor, images[:, :, ::-1].copy(), method, target=3)
    np.testing.assert_allclose(mirrored, heatmaps[:, :, ::-1], atol=1e-4 * np.abs(heatmaps).max())


def test_remove_top_blackens_the_highest_scoring_pixels():
    images = np.full((2, 28, 28), 200, np.uint8)
    scores = np.arange(2 * 784, dtype=np.float64).reshape(2, 28, 28)
    scores[1] = -scores[1]
    removed = remove_top(images, scores, 0.05)
    assert ((removed == 0).sum((1, 2)) == 39).all()
    assert (removed[0].reshape(-1)[-39:] == 0).all() and (removed[1].reshape(-1)[:39] == 0).all()
    assert (images == 200).all()  # the input is left alone


# ----------------------------------------------------------------------------- the command


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_explain_command_writes_the_run_pictures_and_test_images(synthetic, tmp_path, capsys):
    data, run = synthetic
    out = tmp_path / "pictures"
    code, stdout, err = run_cli(capsys, "explain", run, "--out", out, "--data-dir", data, "--count", 4,
                                "--embedding", "tsne", "--map-size", 100)
    assert code == 0, err
    paths = stdout.split()
    names = {p.rsplit("/", 1)[1] for p in paths}
    assert len(paths) == len(names) == 8
    assert {"filters.png", "activations.png", "feature_map-tsne.png", "confused_pairs.png"} <= names
    assert len([n for n in names if n.startswith("test-") and n.endswith("-occlusion.png")]) == 4
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 200
    assert not RunDir(run).explain_dir.exists()  # --out, not the run folder


def test_explain_command_json_for_files_and_default_folder(synthetic, tmp_path, capsys):
    data, run = synthetic
    images, labels = first_test_images(data, 3)
    (tmp_path / "item.png").write_bytes(png(images[0]))
    np.save(tmp_path / "batch.npy", images[1:])
    run_copy = tmp_path / "run"
    shutil.copytree(run, run_copy)
    code, stdout, err = run_cli(capsys, "explain", "--model", run_copy, tmp_path / "item.png", tmp_path / "batch.npy",
                                "--method", "gradcam", "--target", "Dress", "--top-k", 2, "--json", "--no-run-pictures")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["method"] == "gradcam" and result["run_pictures"] == []
    assert [e["file"] for e in result["images"]] == [str(tmp_path / "item.png")] + \
        [f"{tmp_path / 'batch.npy'}[{i}]" for i in range(2)]
    expected = attribute(load_model(run), images, "gradcam", target="Dress")
    for entry, heatmap, label in zip(result["images"], expected, labels, strict=True):
        assert entry["target"] == "Dress" and isinstance(entry["in_distribution"], bool)  # as predict says
        assert entry["top"][0]["label"] == CLASS_NAMES[label] and len(entry["top"]) == 2
        np.testing.assert_allclose(entry["heatmap"], heatmap, rtol=1e-3, atol=1e-6)
    explain_dir = RunDir(run_copy).explain_dir
    assert sorted(p.name for p in explain_dir.iterdir()) == ["batch-0-gradcam.png", "batch-1-gradcam.png",
                                                             "item-gradcam.png"]


def test_explain_answers_each_file_it_can_and_names_each_refused_one(synthetic, tmp_path, capsys):
    data, run = synthetic
    images, _ = first_test_images(data, 1)
    (tmp_path / "item.png").write_bytes(png(images[0]))
    Image.new("RGB", (320, 240), (236, 230, 220)).save(tmp_path / "blank.png")
    (tmp_path / "notes.jpg").write_bytes(b"not a picture")
    files = [tmp_path / "item.png", tmp_path / "blank.png", tmp_path / "notes.jpg"]
    code, out, err = run_cli(capsys, "explain", "--model", run, *files, "--out", tmp_path / "out", "--json",
                             "--no-run-pictures")
    assert code == 0, err
    result = json.loads(out)
    assert [e["file"] for e in result["images"]] == [str(files[0])]
    assert [r["file"] for r in result["refused"]] == [str(files[1]), str(files[2])]
    assert "no object found" in result["refused"][0]["error"]
    code, out, err = run_cli(capsys, "explain", "--model", run, *files, "--out", tmp_path / "out2", "--no-run-pictures")
    assert code == 0 and out.splitlines() == [str(tmp_path / "out2" / "item-occlusion.png")]
    assert err.count("fmnist: not explained: ") == 2
    code, out, err = run_cli(capsys, "explain", "--model", run, *files[1:], "--out", tmp_path / "out3")
    assert code == 2 and err.startswith("fmnist: error: none of the 2 files could be explained")


@pytest.mark.parametrize("argv, message", [
    (["--target", "Hat"], "--target: unknown class 'Hat'"),
    (["--target", "12"], "--target: class index 12 is outside 0..9"),
    (["--count", "0"], "--count must be >= 1, got 0"),
    (["NOFILE.png"], "file not found"),
], ids=["target-name", "target-index", "count", "missing-image"])
def test_explain_command_bad_input_is_one_line(synthetic, tmp_path, capsys, argv, message):
    _, run = synthetic
    code, out, err = run_cli(capsys, "explain", run, *[str(tmp_path / a) if a.endswith(".png") else a for a in argv],
                             "--out", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.startswith("fmnist: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_explain_command_refuses_an_unknown_method_and_a_missing_run(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", str(tmp_path), "--method", "lime"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "invalid choice: 'lime'" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "explain", "--model", tmp_path / "nothing")
    assert code == 2 and err == f"fmnist: error: {tmp_path / 'nothing'}: no such run folder\n"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "explain")
    assert code == 2 and "no trained model under runs/" in err and len(err.splitlines()) == 1


def test_explain_command_takes_the_newest_run_and_says_so(synthetic, tmp_path, capsys, monkeypatch):
    data, run = synthetic
    newest = tmp_path / "runs" / "newest"
    shutil.copytree(run, newest)
    (tmp_path / "item.png").write_bytes(png(first_test_images(data, 1)[0][0]))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "explain", "item.png", "--no-run-pictures")
    assert code == 0, err
    assert out.split() == [str(RunDir(newest).explain_dir.relative_to(tmp_path) / "item-occlusion.png")]
    assert "using runs/newest" in err


def test_without_captum_one_line_names_the_extra(synthetic, monkeypatch, capsys):
    _, run = synthetic
    monkeypatch.setitem(sys.modules, "captum", None)  # `import captum` now raises ImportError
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    code, _, err = run_cli(capsys, "explain", run)
    assert code == 2
    assert err == "fmnist: error: explanations need captum: pip install 'fmnist[explain]'\n"
    with pytest.raises(FmnistError, match="pip install 'fmnist.explain.'"):
        attribute(load_model(run), np.zeros((1, 28, 28), np.uint8))


# ----------------------------------------------------------------------------- the service


def test_service_explains_the_predicted_class(synthetic):
    pytest.importorskip("fastapi")
    data, run = synthetic
    images, labels = first_test_images(data, 1)
    with running_server(run) as server:
        status, predicted = post_image(server, png(images[0]), "/v1/predict?top_k=2&input=true")
        assert status == 200
        status, explained = post_image(server, png(images[0]), "/v1/explain?top_k=2&input=true")
        assert status == 200
        status, refused = post_image(server, b"not a picture", "/v1/explain")
        assert status == 415 and list(refused) == ["detail"]
    explanation = explained.pop("explanation")
    assert explained == predicted  # the same prediction object as /v1/predict
    assert explanation["method"] == DEFAULT_METHOD == "occlusion"
    assert explanation["target"] == CLASS_NAMES[labels[0]]
    heatmap = np.asarray(explanation["heatmap"])
    expected = attribute(load_model(run), [Image.open(io.BytesIO(png(images[0])))])[0]  # as uploaded
    np.testing.assert_allclose(heatmap, expected, rtol=1e-3, atol=1e-6)
    assert explanation["png"].startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(explanation["png"].split(",", 1)[1]))) as overlay:
        assert overlay.size == (28, 28) and overlay.mode == "RGB"
        red = np.asarray(overlay)[..., 0].astype(int) - np.asarray(overlay)[..., 2]
    assert red[band(labels[0])].mean() > red[~band(labels[0])].mean() + 20  # the band lit up red


def test_service_without_captum_answers_501(synthetic, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    data, run = synthetic
    fake = tmp_path / "no-captum" / "captum"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named captum')\n")
    monkeypatch.setenv("PYTHONPATH", f"{fake.parent}:{':'.join(sys.path)}")
    images, _ = first_test_images(data, 1)
    with running_server(run) as server:
        status, body = post_image(server, png(images[0]), "/v1/explain")
        assert status == 501 and body == {"detail": "explanations need captum: pip install 'fmnist[explain]'"}
        assert post_image(server, png(images[0]), "/v1/predict")[0] == 200


def test_service_admits_a_bounded_number_of_explanations(monkeypatch):
    """Explanations beyond EXPLAIN_QUEUE at once get 503 with Retry-After, not an endless queue."""
    pytest.importorskip("fastapi")
    from fmnist.serve import errors
    from fmnist.serve import explainer as explaining
    monkeypatch.setattr(explaining, "explanation", lambda predictor, image, target: time.sleep(0.05) or {"target": target})
    explainer = explaining.Explainer(predictor=None)

    async def burst():
        return await asyncio.gather(*(explainer.explain(None, i) for i in range(explaining.EXPLAIN_QUEUE + 4)),
                                    return_exceptions=True)

    try:
        answers = asyncio.run(burst())
    finally:
        explainer.shutdown()
    refused = [a for a in answers if isinstance(a, errors.HTTPError)]
    assert [a["target"] for a in answers if isinstance(a, dict)] == list(range(explaining.EXPLAIN_QUEUE))
    assert len(refused) == 4 and all(e.status == 503 and e.headers["retry-after"] for e in refused)
    assert explainer.admitted == 0


# ----------------------------------------------------------------------------- faithfulness


def test_the_default_method_points_at_the_pixels_the_prediction_rests_on(trained_run, data_dir):
    """Removing (blackening) the 5% of pixels with the highest attribution lowers the predicted
    class's probability far more than removing as many of the object's pixels at random."""
    images, _ = load_split("test", data_dir)
    result = faithfulness(load_model(trained_run), images[:64])
    assert result.method == DEFAULT_METHOD
    assert result.attributed_drop >= 0.2
    assert result.ratio >= 3, result
