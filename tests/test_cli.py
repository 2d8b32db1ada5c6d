import json

import pytest
from helpers import fmnist_cli

from fmnist.cli import main
from fmnist.run import RunDir

COMMANDS = ["download", "train", "evaluate", "plot", "models", "predict", "export", "serve", "report"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: fmnist " + command in capsys.readouterr().out


def test_bad_flag_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--batch-size", "many"])
    assert info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_choices_come_from_the_config(capsys):
    """Optimisers, schedules, precisions and inits are declared once, as the config's types;
    argparse refuses any other value itself."""
    with pytest.raises(SystemExit) as info:
        main(["train", "--optimizer", "lamb"])
    assert info.value.code == 2
    assert "argument --optimizer: invalid choice: 'lamb'" in capsys.readouterr().err


def test_user_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (bad / name).write_bytes(b"\x1f\x8b\x08garbage")
    cases = [
        (["train", "--data-dir", str(bad), "--out", str(tmp_path / "r")], "corrupt or truncated gzip"),
        (["evaluate", str(tmp_path / "missing")], "no such run folder"),
        (["train", "--model", "resnet9000", "--data-dir", str(bad)], None),
        (["train", "--config", str(tmp_path / "none.toml")], "cannot read config"),
    ]
    for args, expected in cases:
        result = fmnist_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("fmnist: error: "), result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
        if expected:
            assert expected in result.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_train_evaluate_plot_end_to_end(synthetic_dir, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    assert main(["train", "--data-dir", str(synthetic_dir), "--steps", "30", "--batch-size", "32",
                 "--val-size", "64", "--normalize", "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "step      0  loss" in out and "test accuracy" in out
    assert main(["evaluate", str(run), "--json", "--data-dir", str(synthetic_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["accuracy"] <= 1
    assert len(report["per_class"]) == 10
    matrix = report["confusion_matrix"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 160
    assert main(["evaluate", str(run), "--data-dir", str(synthetic_dir)]) == 0
    assert "confusion matrix" in capsys.readouterr().out
    (run / "cost.png").unlink()
    assert main(["plot", str(run), "--data-dir", str(synthetic_dir)]) == 0
    assert (run / "cost.png").is_file()


def test_models_lists_the_post_network(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["post"]["parameters"] == 3_274_634
    assert 27e6 < rows["post"]["flops_per_image"] < 29e6


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be > 0, got -1"),
    (["--lr", "0"], "--lr must be > 0, got 0"),
    (["--keep-prob", "1.5"], "--keep-prob must be in (0, 1], got 1.5"),
    (["--keep-prob", "0"], "--keep-prob must be in (0, 1], got 0"),
    (["--momentum", "-3"], "--momentum must be in [0, 1), got -3"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0, got -1"),
])
def test_out_of_range_values_are_one_line_naming_flag_and_range(tmp_path, flags, message):
    result = fmnist_cli("train", *flags, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr == f"fmnist: error: {message}\n" and result.stdout == ""
    assert not (tmp_path / "run").exists()
