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
