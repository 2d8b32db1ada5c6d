import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import fmnist_cli, losses_written

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


def folder_state(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_train_refuses_a_folder_that_is_not_empty_and_changes_nothing(synthetic_dir, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    before = folder_state(out)
    result = fmnist_cli("train", "--data-dir", synthetic_dir, "--steps", "2", "--val-size", "64", "--out", out,
                        "--quiet")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{out}: is not empty; choose another --out" in result.stderr
    assert folder_state(out) == before


def test_a_second_process_cannot_train_a_run_being_trained(shared_synthetic_dir, tmp_path):
    """While one process resumes a run, another resuming it is refused and changes nothing."""
    run = RunDir(tmp_path / "run")
    flags = ["--data-dir", shared_synthetic_dir, "--batch-size", "32", "--val-size", "64", "--no-plots", "--quiet"]
    assert fmnist_cli("train", "--steps", "4", "--out", run.path, *flags).returncode == 0
    first = subprocess.Popen([sys.executable, "-m", "fmnist", "train", "--resume", str(run.path), "--steps", "100000",
                              "--checkpoint-every", "0", "--log-every", "1", "--threads", "1", *map(str, flags)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while losses_written(run) <= 4 and time.monotonic() < deadline:  # it has the lock once it writes
            time.sleep(0.05)
        second = fmnist_cli("train", "--resume", run.path, "--steps", "200000", *flags)
        assert second.returncode == 2 and "another fmnist process is training this run" in second.stderr
        assert second.stderr.count("\n") == 1
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("target", ["config.json", "metrics.jsonl"])
def test_a_full_disk_is_one_line(synthetic_dir, tmp_path, monkeypatch, capsys, target):
    """Writes that fail for lack of space (/dev/full answers ENOSPC) end in one line naming the file."""
    import fmnist.io

    if target == "metrics.jsonl":
        monkeypatch.setattr(RunDir, "metrics_path", property(lambda self: Path("/dev/full")))
        expected = "/dev/full: cannot write (No space left on device)"
    else:
        real_fsync = os.fsync

        def full(fd):
            if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".config.json."):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        monkeypatch.setattr(fmnist.io.os, "fsync", full)
        expected = f"{tmp_path / 'r' / 'config.json'}: cannot write (No space left on device)"
    code = main(["train", "--data-dir", str(synthetic_dir), "--steps", "30", "--batch-size", "32", "--val-size", "64",
                 "--log-every", "1", "--out", str(tmp_path / "r"), "--quiet", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"fmnist: error: {expected}\n"


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
