"""Calibration (temperature, expected calibration error) and the out-of-distribution score:
the figures against hand-made cases, a calibrated run end to end on synthetic data, and on the
real data the flag against inputs that are not clothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fmnist_cli, quiet, small_config

from fmnist import FmnistError
from fmnist.data import load_split, to_tensor
from fmnist.inference.calibrate import (
    PHOTO_PASS_RATE,
    OodDetector,
    expected_calibration_error,
    fit_temperature,
    logits_and_features,
    reliability,
)
from fmnist.inference.outliers import _smooth, draw_outliers, framed
from fmnist.inference.predictor import load_model
from fmnist.run import RunDir
from fmnist.training.loop import train

# ----------------------------------------------------------------------------- the figures


def test_ece_of_hand_made_predictions():
    # 10 predictions 80% sure, 8 right: perfectly calibrated.
    p = torch.tensor([[0.8, 0.2]] * 10)
    labels = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(p, labels) == pytest.approx(0.0, abs=1e-6)
    # 90% sure, half right: a gap of 0.4 everywhere.
    p = torch.tensor([[0.9, 0.1]] * 10)
    labels = torch.tensor([0] * 5 + [1] * 5)
    assert expected_calibration_error(p, labels) == pytest.approx(0.4, abs=1e-6)
    # Two bins of equal weight, gaps 0.1 and 0.3: their mean.
    p = torch.tensor([[0.6, 0.4]] * 10 + [[0.95, 0.05]] * 10)
    labels = torch.tensor([0] * 5 + [1] * 5 + [0] * 10)
    assert expected_calibration_error(p, labels) == pytest.approx((0.1 + 0.05) / 2, abs=1e-6)
    bins = reliability(p, labels)
    assert sum(bins["count"]) == 20 and len(bins["centers"]) == 15
    assert [a for a in bins["accuracy"] if a is not None] == pytest.approx([0.5, 1.0])


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=g) * 3
    for true_t in (0.5, 2.0):
        labels = torch.multinomial((logits / true_t).softmax(1), 1, generator=g).squeeze(1)
        assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)



def test_fit_temperature_does_not_move_with_float_rounding():
    """Logits that differ by rounding (another thread count; weights saved and loaded) give the
    same temperature, also when every image is right with room to spare: the likelihood then
    falls towards 0 with T, and the fit takes the highest T at which it is 0 to within rounding,
    not the lowest it may give."""
    g = torch.Generator().manual_seed(0)
    for margin in (0.0, 25.0):
        logits = torch.randn(64, 10, generator=g) * 3
        drawn = torch.multinomial(logits.softmax(1), 1, generator=g).squeeze(1)  # T about 1
        labels = logits.argmax(1) if margin else drawn
        logits[torch.arange(64), labels] += margin
        rounded = logits + torch.randn(logits.shape, generator=g) * 4e-6
        t = fit_temperature(logits, labels)
        assert fit_temperature(rounded, labels) == pytest.approx(t, rel=1e-5)
        at, up, down, far_up = (F.cross_entropy(logits.double() / s, labels).item()
                                for s in (t, t * 1.01, t / 1.01, t * 1.5))
        if margin:
            assert at < 1e-10 < far_up
        else:
            assert at <= min(up, down)


def test_detector_learns_what_is_not_clothing_and_keeps_the_pass_rate():
    """Features of 'clothing' around one point, of what is not around another: the fitted
    detector passes 95% of held-out clothing, flags the other side, and round-trips."""
    g = torch.Generator().manual_seed(0)
    inside = {"a": torch.randn(2000, 6, generator=g), "b": torch.randn(2000, 3, generator=g)}
    outside = {"a": torch.randn(800, 6, generator=g) + 3, "b": torch.randn(800, 3, generator=g) - 3}
    val = {"a": torch.randn(1000, 6, generator=g), "b": torch.randn(1000, 3, generator=g)}
    detector = OodDetector.fit(inside, torch.ones(2000), outside, torch.ones(800), val)
    assert detector.layers == ["a", "b"]
    assert float((detector.score(val) <= detector.threshold).float().mean()) == pytest.approx(0.95, abs=0.002)
    far = {"a": torch.randn(500, 6, generator=g) + 3, "b": torch.randn(500, 3, generator=g) - 3}
    assert float((detector.score(far) > detector.threshold).float().mean()) > 0.99
    # Held-out photos that score higher raise the threshold so that PHOTO_PASS_RATE of them pass.
    photos = {"a": torch.randn(400, 6, generator=g) + 1, "b": torch.randn(400, 3, generator=g) - 1}
    raised = OodDetector.fit(inside, torch.ones(2000), outside, torch.ones(800), val, photos)
    assert float((raised.score(photos) <= raised.threshold).float().mean()) == pytest.approx(PHOTO_PASS_RATE, abs=0.003)
    assert raised.threshold > detector.threshold
    again = OodDetector.from_saved(detector.tensors(), detector.to_json(), "test")
    torch.testing.assert_close(again.score(far), detector.score(far))


def test_drawn_outliers_are_seeded_images_of_every_kind():
    fashion = np.random.default_rng(0).integers(0, 256, (30, 28, 28)).astype(np.uint8)
    sets = draw_outliers(fashion, per_kind=12, seed=3)
    assert set(sets) == {"noise", "blank", "gradients", "text", "shapes", "faces", "textures", "silhouettes",
                         "strokes", "inverted"}
    for kind, images in sets.items():
        assert images.dtype == np.uint8 and images.shape == (12, 28, 28), kind
        assert images.max() > images.min() or kind == "blank", kind
    np.testing.assert_array_equal(sets["text"], draw_outliers(fashion, per_kind=12, seed=3)["text"])
    assert not np.array_equal(sets["text"], draw_outliers(fashion, per_kind=12, seed=4)["text"])
    assert all(any(np.array_equal(255 - f, image) for f in fashion) for image in sets["inverted"])


def test_a_smoothed_stroke_runs_through_its_corners_and_stays_between_them():
    corners = np.array([[10.0, 10.0], [50.0, 80.0], [90.0, 20.0], [100.0, 100.0]])
    path = _smooth(corners, steps=8)
    assert len(path) == 3 * 8 + 1
    np.testing.assert_allclose(path[::8], corners)  # every corner is on the path, in order
    assert path.min() > 0 and path.max() < 110  # a gentle curve, no overshoot far past them


def test_framed_fits_what_is_drawn_to_the_frame_as_the_preparation_does():
    image = np.zeros((28, 28), np.uint8)
    image[10:14, 5:13] = 200  # a small bar, 8 wide and 4 high
    (out,) = framed(image[None])
    rows, cols = np.flatnonzero(out.max(1) > 12), np.flatnonzero(out.max(0) > 12)
    assert cols[-1] - cols[0] + 1 == 28 and 12 <= rows[-1] - rows[0] + 1 <= 16
    assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1  # centred
    blank = np.zeros((1, 28, 28), np.uint8)
    np.testing.assert_array_equal(framed(blank), blank)


# ----------------------------------------------------------------------------- a calibrated run


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory, shared_synthetic_dir):
    out = tmp_path_factory.mktemp("runs") / "calibrated"
    train(small_config(shared_synthetic_dir, out, steps=30), progress=False, log=quiet)
    return out


def test_training_calibrates_the_model(calibrated_run):
    meta = RunDir(calibrated_run).read_meta()
    c = meta.calibration
    assert 0.05 <= c["temperature"] <= 20 and meta.temperature == c["temperature"]
    assert set(c["validation"]) == {"ece", "nll", "ece_calibrated", "nll_calibrated"}
    assert c["validation"]["nll_calibrated"] <= c["validation"]["nll"] + 1e-6  # the fit minimises it
    assert RunDir(calibrated_run).ood_path.is_file()
    assert c["ood"]["pass_rate"] == 0.95


def test_predictions_carry_the_flag_and_tempered_probabilities(calibrated_run, shared_synthetic_dir):
    predictor = load_model(calibrated_run)
    images, _ = load_split("test", shared_synthetic_dir)
    result = predictor.predict(images[:20], top_k=10)["predictions"]
    assert all(set(p) == {"file", "top", "ood_score", "in_distribution"} for p in result)
    assert all(p["in_distribution"] == (p["ood_score"] <= predictor.detector.threshold) for p in result)
    logits = predictor.model(to_tensor(images[:20], predictor.mean, predictor.std)).detach()
    expected = (logits / predictor.temperature).softmax(1).numpy()
    got = np.array([[t["probability"] for t in sorted(p["top"], key=lambda t: t["index"])] for p in result])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # Noise and a blank canvas are nothing like the training images.
    odd = np.stack([np.random.default_rng(0).integers(0, 256, (28, 28)), np.zeros((28, 28))]).astype(np.uint8)
    assert [p["in_distribution"] for p in predictor.predict(odd)["predictions"]] == [False, False]


def test_about_95_percent_of_validation_images_pass(calibrated_run, shared_synthetic_dir):
    predictor = load_model(calibrated_run)
    images, _ = load_split("train", shared_synthetic_dir)
    _, scores = predictor.assess(images[:64])  # the validation split of small_config
    assert np.mean(scores <= predictor.detector.threshold) == pytest.approx(0.95, abs=0.02)


def test_calibrate_command_refits_an_uncalibrated_run(calibrated_run, shared_synthetic_dir, tmp_path):
    import shutil

    run = shutil.copytree(calibrated_run, tmp_path / "old")
    meta = json.loads((run / "model.json").read_text())
    del meta["calibration"]
    (run / "model.json").write_text(json.dumps(meta))
    (run / "ood.safetensors").unlink()
    old = load_model(run).predict(np.zeros((1, 28, 28), np.uint8))["predictions"][0]
    assert old["ood_score"] is None and old["in_distribution"] is None

    result = fmnist_cli("calibrate", "--model", run, "--data-dir", shared_synthetic_dir)
    assert result.returncode == 0, result.stderr
    assert "temperature" in result.stdout and "threshold" in result.stdout
    refit, fitted = RunDir(run).read_meta().calibration, RunDir(calibrated_run).read_meta().calibration
    assert refit["temperature"] == pytest.approx(fitted["temperature"], rel=0.05)
    assert refit["ood"]["threshold"] == pytest.approx(fitted["ood"]["threshold"], rel=0.05)
    new = load_model(run).predict(np.zeros((1, 28, 28), np.uint8))["predictions"][0]
    assert new["in_distribution"] is False


def test_calibrate_refuses_a_run_without_validation_split(shared_synthetic_dir, tmp_path):
    out = tmp_path / "noval"
    logs = []
    train(small_config(shared_synthetic_dir, out, val_size=0), progress=False, log=logs.append)
    assert any("not calibrated" in line for line in logs)
    assert RunDir(out).read_meta().calibration == {}
    result = fmnist_cli("calibrate", "--model", out, "--data-dir", shared_synthetic_dir)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "validation split" in result.stderr


@pytest.mark.parametrize("change, message", [
    (lambda m: m["calibration"].update(temperature=-1), "temperature"),
    (lambda m: m["calibration"].update(temperature="hot"), "temperature"),
    (lambda m: m["calibration"]["ood"].update(layers=[]), "out-of-distribution"),
    (lambda m: m["calibration"]["ood"].update(scale=0), "out-of-distribution"),
    (lambda m: m["calibration"]["ood"].update(method="knn"), "fmnist calibrate --model"),
])
def test_malformed_calibration_is_one_clear_error(calibrated_run, tmp_path, change, message):
    import shutil

    run = shutil.copytree(calibrated_run, tmp_path / "bad")
    meta = json.loads((run / "model.json").read_text())
    change(meta)
    (run / "model.json").write_text(json.dumps(meta))
    with pytest.raises(FmnistError, match=message):
        load_model(run)


def test_missing_or_corrupt_bank_is_one_clear_error(calibrated_run, tmp_path):
    import shutil

    run = shutil.copytree(calibrated_run, tmp_path / "bank")
    (run / "ood.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FmnistError, match="not a valid safetensors"):
        load_model(run)
    (run / "ood.safetensors").unlink()
    with pytest.raises(FmnistError, match="fmnist calibrate"):
        load_model(run)


def test_evaluate_reports_calibration_and_draws_the_reliability_diagram(calibrated_run, shared_synthetic_dir, tmp_path):
    import shutil

    run = shutil.copytree(calibrated_run, tmp_path / "eval")
    result = fmnist_cli("evaluate", "--model", run, "--json", "--data-dir", shared_synthetic_dir)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    for key in ("ece", "nll", "ece_uncalibrated", "nll_uncalibrated", "temperature"):
        assert isinstance(figures[key], float)
    assert figures["temperature"] == RunDir(run).read_meta().temperature
    assert (run / "reliability.png").stat().st_size > 10_000


def test_onnx_probabilities_are_tempered(calibrated_run, tmp_path, shared_synthetic_dir):
    pytest.importorskip("onnxruntime")
    import shutil

    from fmnist.export import export_onnx, onnx_session

    run = shutil.copytree(calibrated_run, tmp_path / "onnx")
    meta = json.loads((run / "model.json").read_text())
    meta["calibration"]["temperature"] = 2.5  # far from 1, so that a missing division shows
    (run / "model.json").write_text(json.dumps(meta))
    path = export_onnx(run, tmp_path / "m.onnx", data_dir=shared_synthetic_dir)
    images, _ = load_split("test", shared_synthetic_dir)
    session = onnx_session(path)
    logits, probabilities = session.run(None, {session.get_inputs()[0].name: images[:16, None].astype(np.float32)})
    np.testing.assert_allclose(probabilities, torch.tensor(logits / 2.5).softmax(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(probabilities, load_model(run).probabilities(images[:16]), atol=1e-4)


def test_detector_round_trips_through_its_saved_form(calibrated_run, shared_synthetic_dir):
    predictor = load_model(calibrated_run)
    d = predictor.detector
    again = OodDetector.from_saved(d.tensors(), d.to_json(), "test")
    images, _ = load_split("test", shared_synthetic_dir)
    _, features = logits_and_features(predictor.model, to_tensor(images, predictor.mean, predictor.std))
    torch.testing.assert_close(again.score(features), d.score(features))


def test_features_ignore_passes_of_the_network_made_by_another_thread():
    """The service explains through the same network in another thread while predictions take
    features from it: a pass made by that thread in the middle of a prediction's is not kept."""
    import threading

    from fmnist.models import build_model

    torch.manual_seed(0)
    model = build_model("fast").eval()
    images = torch.randn(6, 1, 28, 28)
    _, alone = logits_and_features(model, images, tta=True)

    class Interleaved(torch.nn.Module):
        """The network, with another thread's pass (of 5 other images) in the middle of each."""

        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            out = self.net(x)
            other = threading.Thread(target=lambda: self.net(torch.randn(5, 1, 28, 28)))
            other.start()
            other.join()
            return out

    _, interleaved = logits_and_features(Interleaved(), images, tta=True)
    assert alone.keys() == interleaved.keys() == {"first_conv", "last_conv", "penultimate"}
    for name, features in alone.items():
        torch.testing.assert_close(interleaved[name], features)


# ----------------------------------------------------------------------------- real data


def test_real_model_is_calibrated_and_flags_what_is_not_clothing(trained_run, data_dir):
    predictor = load_model(trained_run)
    test_images, _ = load_split("test", data_dir)
    _, scores = predictor.assess(test_images[:2000])
    passing = np.mean(scores <= predictor.detector.threshold)
    assert 0.92 <= passing <= 0.98, passing
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)
    blank = np.repeat(np.linspace(0, 255, 20).astype(np.uint8)[:, None, None], 28, 1).repeat(28, 2)
    inverted = 255 - test_images[:200]  # dark on light: a picture prepared without its background removed
    for name, images in (("noise", noise), ("blank", blank), ("inverted", inverted)):
        _, scores = predictor.assess(images)
        assert np.mean(scores > predictor.detector.threshold) >= 0.95, name
    # Every kind the detector was fitted on, drawn anew from another seed, and framed or not.
    for name, images in draw_outliers(test_images, per_kind=200, seed=12345).items():
        _, scores = predictor.assess(images)
        assert np.mean(scores > predictor.detector.threshold) >= 0.95, name


def test_real_model_passes_its_test_images_made_photo_like(trained_run, data_dir):
    """Clothing as the photo preparation makes it look (turned, cropped again, bent, blurred)
    is clothing: most of it passes, though far less than the plain test images (a model trained
    on the images alone tells some of it from solid shapes no better than the detector does;
    60% pass at 300 steps)."""
    from fmnist.data.augment import random_photo

    predictor = load_model(trained_run)
    test_images, _ = load_split("test", data_dir)
    norm = predictor.meta.normalization
    x = to_tensor(test_images[:1000], norm.mean, norm.std)
    photo_like = random_photo(x, torch.Generator().manual_seed(5), 1.0, norm.black, norm.std)
    raw = np.clip(np.round((photo_like[:, 0].numpy() * norm.std + norm.mean) * 255), 0, 255).astype(np.uint8)
    _, scores = predictor.assess(raw)
    assert np.mean(scores <= predictor.detector.threshold) > 0.5


def test_predict_command_says_when_a_picture_is_not_clothing(trained_run, tmp_path):
    path = tmp_path / "noise.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (2, 28, 28)).astype(np.uint8))
    result = fmnist_cli("predict", "--model", trained_run, path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("does not look like clothing") == 2
    assert result.stdout.count("trained on Fashion-MNIST alone flags most real photos") == 1  # once, not a photo run
    result = fmnist_cli("predict", "--model", trained_run, path, "--json")
    answer = json.loads(result.stdout)
    assert [p["in_distribution"] for p in answer["predictions"]] == [False, False]
    assert answer["trained_on_photos"] is False
