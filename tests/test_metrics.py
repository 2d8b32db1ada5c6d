"""Metrics sinks: metrics.jsonl cut back on resume, and TensorBoard event files read back by
TensorBoard's own reader, with no duplicated steps after a kill and --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fmnist import FmnistError
from fmnist.cli import main
from fmnist.config import TrainConfig
from fmnist.run import EndRecord, EvalRecord, LossRecord, RunDir
from fmnist.training.metrics import JsonlSink, open_metrics

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's event files, as TensorBoard shows it."""
    accumulator = event_accumulator.EventAccumulator(str(run.tensorboard_dir), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def small_flags(data_dir, out, steps: int = 50) -> list[str]:
    return ["train", "--data-dir", str(data_dir), "--steps", str(steps), "--batch-size", "32", "--val-size", "64",
            "--precision", "fp32", "--log-every", "10", "--tensorboard", "--out", str(out), "--quiet"]


def test_tensorboard_holds_every_logged_loss(synthetic_dir, tmp_path):
    run = RunDir(tmp_path / "r")
    assert main(small_flags(synthetic_dir, run.path) + ["--eval-every", "25"]) == 0
    scalars = read_scalars(run)
    losses = run.losses()
    assert [step for step, _ in scalars["train/loss"]] == [r.step + 1 for r in losses] == list(range(1, 51))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r.loss for r in losses], rel=1e-6)
    assert [step for step, _ in scalars["val/accuracy"]] == [25, 50]
    assert scalars["test/accuracy"][-1][1] == pytest.approx(run.evaluations("test")[-1].accuracy)
    accumulator = event_accumulator.EventAccumulator(str(run.tensorboard_dir), size_guidance={"images": 0})
    accumulator.Reload()
    assert {"plots/confusion_matrix", "plots/samples", "plots/cost"} <= set(accumulator.Tags()["images"])


def test_tensorboard_curves_have_no_duplicated_steps_after_a_kill(synthetic_dir, tmp_path):
    run = RunDir(tmp_path / "r")
    steps = 120
    flags = small_flags(synthetic_dir, run.path, steps) + ["--checkpoint-every", "40", "--eval-every", "20"]
    process = subprocess.Popen([sys.executable, "-m", "fmnist", *flags], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    # Kill it once it has trained past its first checkpoint (step 40) but not to the end.
    while time.monotonic() < deadline and process.poll() is None:
        if run.last_state.exists() and run.metrics_path.exists() and len(run.losses()) >= 70:
            break
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(run.losses()) < steps  # killed before the end
    assert main(["train", "--resume", str(run.path), "--quiet"]) == 0

    scalars = read_scalars(run)
    loss_steps = [step for step, _ in scalars["train/loss"]]
    assert loss_steps == list(range(1, steps + 1))  # each step once, in order
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([r.loss for r in run.losses()], rel=1e-6)
    assert [step for step, _ in scalars["val/accuracy"]] == [20, 40, 60, 80, 100, 120]
    assert [r.step for r in run.losses()] == list(range(steps))


def test_jsonl_cut_keeps_the_first_steps_and_refuses_a_shortened_file(tmp_path):
    run = RunDir.create(tmp_path / "r", "post")
    sink = JsonlSink(run)
    for step in range(6):
        sink.write(LossRecord(step, 1.0, 0.1))
    sink.write(EvalRecord(6, "val", 0.5, 1.0, 1.0, 0.1))
    sink.write(LossRecord(6, 1.0, 0.1))
    sink.write(EndRecord(7, 1.0))
    sink.close()
    with run.metrics_path.open("ab") as f:
        f.write(b'{"step": 7, "lo')  # a line cut short by a kill
    metrics = open_metrics(run, TrainConfig(), resume_from=6)
    metrics.close()
    assert [type(r).__name__ for r in run.read_metrics()] == ["LossRecord"] * 6 + ["EvalRecord"]
    with pytest.raises(FmnistError, match="it was changed"):
        open_metrics(run, TrainConfig(), resume_from=9)


def test_tensorboard_without_the_extra_says_how_to_get_it(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    assert main(small_flags(synthetic_dir, tmp_path / "r", steps=3)) == 2
    assert "pip install 'fmnist[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_resumed_run_writes_a_config_naming_its_sinks(synthetic_dir, tmp_path):
    assert main(small_flags(synthetic_dir, tmp_path / "r", steps=5)) == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["tensorboard"] is True
