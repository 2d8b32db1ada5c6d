import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import fmnist_cli, losses_written

from fmnist.cli import main
from fmnist.presets import PRESETS
from fmnist.run import RunDir

COMMANDS = ["download", "train", "presets", "evaluate", "plot", "models", "predict", "export", "serve", "report"]


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
        (["evaluate", "--model", str(tmp_path / "missing")], "no such run folder"),
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
    assert main(["evaluate", "--model", str(run), "--json", "--data-dir", str(synthetic_dir)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0 <= report["accuracy"] <= 1
    assert len(report["per_class"]) == 10
    matrix = report["confusion_matrix"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 160
    assert main(["evaluate", "--model", str(run), "--data-dir", str(synthetic_dir)]) == 0
    assert "confusion matrix" in capsys.readouterr().out
    (run / "cost.png").unlink()
    assert main(["plot", "--model", str(run), "--data-dir", str(synthetic_dir)]) == 0
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


# ----------------------------------------------------------------------------- help and mistakes


def test_train_help_groups_the_flags_and_says_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    headings = ["data:", "model:", "optimisation:", "augmentation:", "evaluation:", "checkpoints and resume:",
                "device and distributed:", "output:"]
    positions = [text.index("\n" + h + "\n") for h in headings]
    assert positions == sorted(positions)
    assert "(default: None)" not in text and "default: runs/<time>-<model>" in text
    for block in text.split("\n  -"):
        assert block.count("default:") <= 1, block
    for flag in ("--optimizer", "--schedule", "--precision", "--init", "--preset"):
        block = " ".join(text[text.index(f"  {flag} "):].split("\n  --")[0].split())
        assert "one of: " in block, block
    for choices in ("one of: adam, adamw, sgd", "one of: constant, cosine, onecycle", "one of: auto, fp32, bf16",
                    "one of: post, cpu-fast, cpu-fast-v1, gpu-fast, photo, best"):
        assert choices in " ".join(text.split()), choices
    assert "in (0, 1]; default: 0.75" in " ".join(text.split())  # --keep-prob: its range and default


@pytest.mark.parametrize("args, message", [
    (["train", "--setps", "10"], "fmnist train: error: unrecognized argument --setps; did you mean --steps?"),
    (["train", "--optimizer", "adma"], "fmnist train: error: argument --optimizer: invalid choice: 'adma' "
                                       "(choose from 'adam', 'adamw', 'sgd'); did you mean 'adam'?"),
    (["evalute", "--model", "runs/x"], "fmnist: error: unknown command 'evalute'; did you mean 'evaluate'?"),
    (["predict", "x.png", "--topk", "2"], "fmnist predict: error: unrecognized argument --topk; did you mean --top-k?"),
])
def test_mistyped_flags_and_commands_get_one_line_with_a_suggestion(args, message):
    result = fmnist_cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert "usage:" not in result.stderr


def test_presets_command_lists_recipes_and_measured_figures():
    result = fmnist_cli("presets")
    assert result.returncode == 0, result.stderr
    for name in PRESETS:
        assert f"\n{name}: " in "\n" + result.stdout
    assert "--model post-bn --normalize --epochs 26 --batch-size 256 --optimizer sgd --lr 0.1" in result.stdout
    assert "--model fast --normalize --epochs 10 --batch-size 256 --optimizer sgd --lr 0.2" in result.stdout
    assert "81.92% with --init normal" in result.stdout and "measured: 93.14" in result.stdout
    rows = json.loads(fmnist_cli("presets", "--json").stdout)
    assert [r["name"] for r in rows] == list(PRESETS)
    assert all(r["fields"] == PRESETS[r["name"]] for r in rows if PRESETS[r["name"]])
    assert all(r["measured"] and r["summary"] for r in rows)


# ----------------------------------------------------------------------------- which model


@pytest.fixture
def two_runs(tiny_run, tmp_path, monkeypatch):
    """A working folder with runs/older and runs/newer (copies of the tiny run)."""
    for name, age in (("older", 10), ("newer", 0)):
        run = RunDir(tmp_path / "runs" / name)
        shutil.copytree(tiny_run, run.path)
        os.utime(run.meta_path, (time.time() - age, time.time() - age))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_model_command_takes_model_and_defaults_to_the_newest_run(two_runs, shared_synthetic_dir, capsys):
    data = ["--data-dir", str(shared_synthetic_dir)]
    newest = os.path.join("runs", "newer")
    accuracy = RunDir(newest).read_meta().test_accuracy
    picked = f"fmnist: using {newest}, the most recent run under ./runs (post, test accuracy {accuracy:.2%}); " \
             "choose another with --model RUN_DIR\n"

    assert main(["evaluate", "--model", "runs/older", "--json", *data]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["accuracy"] >= 0 and err == ""
    assert main(["evaluate", "--json", *data]) == 0
    assert capsys.readouterr().err == picked
    assert main(["plot", *data]) == 0
    out, err = capsys.readouterr()
    assert err == picked and out.splitlines()[0] == os.path.join(newest, "cost.png")
    assert main(["export", "--out", "no/such/folder/m.onnx"]) == 2  # picks the newest, then refuses the folder
    assert capsys.readouterr().err == picked + "fmnist: error: no/such/folder: no such folder\n"
    assert main(["serve", "--host", "no-such-host.invalid"]) == 2  # picks the newest, then cannot bind
    err = capsys.readouterr().err
    assert err.startswith(picked + "fmnist: error: cannot serve on no-such-host.invalid:8000: unknown host")
    assert main(["serve", "--port", "70000"]) == 2  # a bad flag is said before anything else
    assert capsys.readouterr().err == "fmnist: error: --port must be in [0, 65535], got 70000\n"


def test_the_positional_run_folder_still_works_with_a_deprecation_note(two_runs, shared_synthetic_dir, capsys):
    assert main(["evaluate", "runs/older", "--json", "--data-dir", str(shared_synthetic_dir)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["accuracy"] >= 0
    assert err == "fmnist: `fmnist evaluate RUN_DIR` is deprecated; write `fmnist evaluate --model runs/older`\n"
    assert main(["evaluate", "runs/older", "--model", "runs/newer"]) == 2
    assert "two models given" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pipes


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_pipe_closed_early_ends_quietly(tiny_run, shared_synthetic_dir, tmp_path, command):
    """`fmnist evaluate --json | head -c 50`, `fmnist predict ... | head`: the reader goes away
    before the output is written; no BrokenPipeError traceback, the status of a tool SIGPIPE
    ended."""
    np.save(tmp_path / "batch.npy", np.zeros((200, 28, 28), np.uint8))
    args = {"evaluate": ["evaluate", "--model", tiny_run, "--json", "--data-dir", shared_synthetic_dir],
            "predict": ["predict", "--model", tiny_run, tmp_path / "batch.npy"]}[command]
    process = subprocess.Popen([sys.executable, "-m", "fmnist", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # as `head` does once it has its lines
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141
    assert err == ""


# ----------------------------------------------------------------------------- the README's `make run`


def make_recipe(target: str, **variables: str) -> str:
    """The shell lines of a Makefile target, its variables filled in."""
    lines = (Path(__file__).resolve().parents[1] / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line[1:].lstrip("@"))
    text = "\n".join(recipe)
    for name, value in variables.items():
        text = text.replace(f"$({name})", value)
    return text


@pytest.mark.parametrize("holds, commands", [
    (None, ["train --out RUN", "evaluate --model RUN"]),
    ("metrics.jsonl", ["train --resume RUN", "evaluate --model RUN"]),
    ("model.json", ["evaluate --model RUN"]),
])
def test_make_run_never_removes_a_run_folder(tmp_path, holds, commands):
    """`make run` trains a fresh folder, resumes an interrupted run, and evaluates a finished one
    again; it deletes nothing (the fmnist it calls here only notes its arguments)."""
    run = tmp_path / "runs" / "post"
    run.mkdir(parents=True)
    if holds:
        (run / holds).write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "fmnist").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    (bin_dir / "fmnist").chmod(0o755)
    recipe = make_recipe("run", RUN_DIR=str(run))
    assert "rm " not in recipe
    result = subprocess.run(["sh", "-ec", recipe], capture_output=True, text=True,
                            env=os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [c.replace("RUN", str(run)) for c in commands]
    assert (run / holds).exists() if holds else run.is_dir()
