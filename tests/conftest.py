"""Shared fixtures: synthetic datasets, the real dataset and a briefly trained model; and the
`real_data` marker, put on every test that needs the real Fashion-MNIST (or a model trained on
it), so that the fast tier runs without them:

    python -m pytest -m "not slow and not real_data"      # minutes, no real data needed
    python -m pytest -m "not slow"                        # + the real data and a 300-step model
    python -m pytest                                      # + training runs of minutes each
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import quiet, small_config, write_dataset

from fmnist.config import TrainConfig
from fmnist.data import find_data_dir

# Fixtures that read the real dataset: a test using any of them, directly or through another
# fixture, is marked real_data.
REAL_DATA_FIXTURES = {"data_dir", "trained_run"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "real_data: needs the real Fashion-MNIST data or a model trained on it "
        "(put on by conftest.py from the fixtures a test uses)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if REAL_DATA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_data)


@pytest.fixture(scope="session")
def data_dir():
    """The real Fashion-MNIST folder (the README's test command installs it)."""
    return find_data_dir(download_missing=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """A run folder with the post's network trained for 300 steps on the real data (about 86%
    test accuracy): enough for tests that need a model that works."""
    from fmnist.training.loop import train

    out = tmp_path_factory.mktemp("runs") / "post-300"
    cfg = TrainConfig(steps=300, out=str(out), plots=False, data_dir=str(data_dir))
    train(cfg, progress=False, log=lambda *_: None)
    return out


@pytest.fixture
def synthetic_dir(tmp_path):
    """A small synthetic dataset of the test's own, free to change."""
    return write_dataset(tmp_path / "fashion")


@pytest.fixture(scope="session")
def shared_synthetic_dir(tmp_path_factory):
    """The same small synthetic dataset for every test of the session: read it, never change it."""
    return write_dataset(tmp_path_factory.mktemp("data") / "fashion")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shared_synthetic_dir):
    """A run folder under runs/ of a temporary folder, trained for a few steps on the shared
    synthetic dataset, for commands that need a model but not a good one: read it, never
    change it (copy it first)."""
    from fmnist.training.loop import train

    out = tmp_path_factory.mktemp("cwd") / "runs" / "tiny"
    train(small_config(shared_synthetic_dir, out, steps=4), progress=False, log=quiet)
    return out


REAL_PHOTOS = Path(__file__).parent / "data" / "photos"  # CC0 photos people took (README there)


@pytest.fixture
def photo_folder(tmp_path, monkeypatch) -> Path:
    """tests/data/photos laid out as a collection of labelled photos: train/<label>/ and
    validation/<label>/, the blank floor among the trousers (the preparation finds nothing on
    it) and a hat (a label with no class); prepared photos are cached in the test's own folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "photos"
    for split in ("train", "validation"):
        for path in sorted(REAL_PHOTOS.glob("*.jpg")):
            if path.stem == "blank-floor":
                continue
            label = "shoes" if path.stem.startswith("shoes") else path.stem
            (root / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / split / label / path.name)
    shutil.copy(REAL_PHOTOS / "blank-floor.jpg", root / "train" / "pants" / "blank-floor.jpg")
    (root / "train" / "hat").mkdir()
    shutil.copy(REAL_PHOTOS / "t-shirt.jpg", root / "train" / "hat" / "cap.jpg")
    return root
