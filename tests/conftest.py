"""Shared fixtures: the real dataset and a briefly trained model for tests that need one."""

from __future__ import annotations

import pytest

from fmnist.config import TrainConfig
from fmnist.data import find_data_dir


@pytest.fixture(scope="session")
def data_dir():
    """The real Fashion-MNIST folder (the README's test command installs it)."""
    return find_data_dir(download_missing=False)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir):
    """A run folder with the seed network trained for 300 steps on the real data (about 86%
    test accuracy): enough for tests that need a model that works."""
    from fmnist.train import train

    out = tmp_path_factory.mktemp("runs") / "seed-300"
    cfg = TrainConfig(steps=300, out=str(out), plots=False, data_dir=str(data_dir))
    train(cfg, progress=False, log=lambda *_: None)
    return out


def write_dataset(directory, n_train: int = 640, n_test: int = 160, seed: int = 0, gz: bool = True):
    """A small synthetic Fashion-MNIST folder: the four IDX files with random contents, each
    class drawn as a brighter band at its own rows so that a network can learn it."""
    import numpy as np

    from fmnist.data import SPLITS, save_idx

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


@pytest.fixture
def synthetic_dir(tmp_path):
    return write_dataset(tmp_path / "fashion")
