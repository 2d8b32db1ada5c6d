"""bench/real_photos.py's `--average`: several runs as one model, their probabilities and
out-of-distribution scores averaged, and a clear error for runs that cannot be averaged."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmnist.inference.predictor import load_model

BENCH = Path(__file__).resolve().parents[1] / "bench"
PHOTOS = Path(__file__).parent / "data" / "photos"


@pytest.fixture
def real_photos(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("real_photos")


def test_the_average_is_the_mean_of_its_runs(real_photos, tiny_run):
    a, b = load_model(tiny_run), load_model(tiny_run)
    b.temperature = 3.0  # another run: softer probabilities, the same scores
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    averaged = real_photos.Averaged([a, b])
    probabilities, scores = averaged.assess(images)
    (pa, sa), (pb, sb) = a.assess(images), b.assess(images)
    assert not np.allclose(pa, pb)
    np.testing.assert_allclose(probabilities, (pa + pb) / 2, rtol=1e-6)
    np.testing.assert_allclose(probabilities.sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(scores, (sa + sb) / 2, rtol=1e-6)
    assert averaged.detector.threshold == pytest.approx(a.detector.threshold)


def test_an_uncalibrated_run_leaves_the_average_without_a_flag(real_photos, tiny_run):
    a, b = load_model(tiny_run), load_model(tiny_run)
    b.detector = None
    averaged = real_photos.Averaged([a, b])
    assert averaged.detector is None
    assert averaged.assess(np.zeros((2, 28, 28), np.uint8))[1] is None


def test_runs_naming_other_classes_are_refused(real_photos, tiny_run):
    a, b = load_model(tiny_run), load_model(tiny_run)
    b.class_names = list(reversed(b.class_names))
    with pytest.raises(real_photos.FmnistError, match="different classes"):
        real_photos.Averaged([a, b])


def test_average_of_one_run_is_a_one_line_error(tiny_run, tmp_path):
    folder = tmp_path / "photos" / "t-shirt"
    folder.mkdir(parents=True)
    (folder / "t-shirt.jpg").write_bytes((PHOTOS / "t-shirt.jpg").read_bytes())
    done = subprocess.run([sys.executable, str(BENCH / "real_photos.py"), str(folder.parent),
                           "--models", str(tiny_run), "--average"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip() == "real_photos: error: --average needs at least two --models"
