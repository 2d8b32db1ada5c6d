"""The post's recipe on the real Fashion-MNIST, end to end through the CLI (minutes)."""

import json

import pytest

from fmnist.cli import main
from fmnist.run import RunDir

pytestmark = pytest.mark.slow


def train_and_read_accuracy(tmp_path, capsys, *flags) -> float:
    run = RunDir(tmp_path / "run")
    assert main(["train", "--out", str(run), "--quiet", *flags]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run), "--json"]) == 0
    accuracy = json.loads(capsys.readouterr().out)["accuracy"]
    assert run.read_meta().test_accuracy == pytest.approx(accuracy)
    for plot in ("cost.png", "samples.png", "confusion_matrix.png", "misclassified.png"):
        assert (run / plot).stat().st_size > 1000
    return accuracy


def test_post_recipe_with_pytorch_init(tmp_path, capsys, data_dir):
    assert train_and_read_accuracy(tmp_path, capsys) >= 0.87


def test_post_recipe_with_the_posts_init(tmp_path, capsys, data_dir):
    assert 0.78 <= train_and_read_accuracy(tmp_path, capsys, "--init", "normal") <= 0.86


def test_cpu_fast_preset(tmp_path, capsys, data_dir):
    """The cpu-fast recipe (its target: 93% within 5 minutes on a 2-core CPU)."""
    assert train_and_read_accuracy(tmp_path, capsys, "--preset", "cpu-fast") >= 0.92
