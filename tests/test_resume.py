"""Checkpoints and resume: a run killed (SIGKILL), stopped (SIGINT, SIGTERM), out of disk space
or diverging continues to exactly the weights and metrics of a run never interrupted."""

import errno
import signal

import pytest
import torch
from helpers import as_flags, assert_same_run, fmnist_cli, quiet, signal_after, weights

from fmnist import FmnistError
from fmnist.config import resolve_train
from fmnist.run import BEST_STATE, LAST_STATE, RunDir
from fmnist.training.checkpoint import load_state
from fmnist.training.loop import train

# Dropout on, an evaluation every 8 steps and a checkpoint every 5: every kind of state counts.
FLAGS = dict(steps=24, batch_size=32, val_size=64, log_every=1, eval_every=8, checkpoint_every=5, plots=False)


@pytest.fixture(scope="module")
def reference(shared_synthetic_dir, tmp_path_factory):
    """The run never interrupted, by the CLI in its own process as the interrupted ones."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = fmnist_cli("train", *as_flags(FLAGS), "--data-dir", str(shared_synthetic_dir), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_sigkill_at_any_step_then_resume_is_bit_identical(shared_synthetic_dir, reference, tmp_path):
    run = RunDir(tmp_path / "run")
    args = ["train", *as_flags(FLAGS), "--data-dir", str(shared_synthetic_dir), "--out", str(run), "--quiet"]
    code, _ = signal_after(args, run, 7, signal.SIGKILL, tmp_path / "1.log")
    assert code == -signal.SIGKILL
    # The checkpoint of step 5 may still have been on its way to the disk: then none is there.
    held = lambda: load_state(run.last_state)["step"] if run.last_state.exists() else 0  # noqa: E731
    first = held()
    assert first in (0, 5, 10, 15, 20)
    # Killed again while resuming, then resumed to the end.
    code, _ = signal_after(["train", "--resume", str(run), "--quiet"], run, 13, signal.SIGKILL, tmp_path / "2.log")
    assert code == -signal.SIGKILL
    second = held()
    assert second >= first
    result = fmnist_cli("train", "--resume", str(run), "--quiet")
    assert result.returncode == 0, result.stderr
    assert (f"resuming from step {second}" in result.stdout) == (second > 0)
    assert_same_run(reference, run)
    assert not list(run.path.glob(".*.tmp"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_at_a_step_boundary_with_a_checkpoint(sig, shared_synthetic_dir, reference, tmp_path):
    run = RunDir(tmp_path / "run")
    args = ["train", *as_flags(FLAGS), "--data-dir", str(shared_synthetic_dir), "--out", str(run), "--quiet"]
    code, output = signal_after(args, run, 3, sig, tmp_path / "out.log")
    assert code == 130, output
    step = load_state(run.last_state)["step"]
    assert f"stopped by {sig.name} after step {step}" in output and f"--resume {run}" in output
    assert "Traceback" not in output
    assert not run.weights_path.exists()
    train(resolve_train(resume=str(run)), progress=False, log=quiet)
    assert_same_run(reference, run)


def test_resume_before_the_first_checkpoint_starts_over(shared_synthetic_dir, reference, tmp_path):
    run = RunDir(tmp_path / "run")
    train(resolve_train(**FLAGS, data_dir=str(shared_synthetic_dir), out=str(run)), progress=False, log=quiet)
    for path in (run.last_state, run.best_state, run.meta_path, run.weights_path):
        path.unlink()
    run.metrics_path.write_text('{"step": 0, "loss": 2.3, "lr": 0.001}\n{"step": 1, "lo')  # cut by a kill
    train(resolve_train(resume=str(run)), progress=False, log=quiet)
    assert_same_run(reference, run)


def test_more_steps_continue_the_run_exactly(shared_synthetic_dir, tmp_path):
    short, long = tmp_path / "short", tmp_path / "long"
    values = FLAGS | dict(steps=8, eval_every=0, data_dir=str(shared_synthetic_dir))
    train(resolve_train(**values, out=str(short)), progress=False, log=quiet)
    with pytest.raises(FmnistError, match="already trained its 8 steps"):
        train(resolve_train(resume=str(short)), progress=False, log=quiet)
    result = train(resolve_train(resume=str(short), steps=16), progress=False, log=quiet)
    assert result.steps == 16 and RunDir(short).read_config()["steps"] == 16
    train(resolve_train(**values | dict(steps=16), out=str(long)), progress=False, log=quiet)
    wa, wb = weights(short), weights(long)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_conflicting_flags(shared_synthetic_dir, tmp_path):
    run = tmp_path / "run"
    train(resolve_train(**FLAGS | dict(steps=2), data_dir=str(shared_synthetic_dir), out=str(run)), progress=False, log=quiet)
    cases = [
        (dict(lr=0.01), "--lr 0.01 conflicts with the resumed run's 0.001"),
        (dict(batch_size=64), "--batch-size 64 conflicts"),
        (dict(steps=1), "--steps 1 would shorten the resumed run"),
        (dict(out=str(tmp_path / "elsewhere")), "a resumed run continues in its own folder"),
    ]
    for flags, message in cases:
        with pytest.raises(FmnistError, match=message):
            resolve_train(resume=str(run), **flags)
    assert resolve_train(resume=str(run), lr=0.001, log_every=3).log_every == 3  # same value, or allowed
    result = fmnist_cli("train", "--resume", str(run), "--seed", "7")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--seed 7 conflicts" in result.stderr
    with pytest.raises(FmnistError, match="no such run folder"):
        resolve_train(resume=str(tmp_path / "missing"))


def test_checkpoints_are_written_every_n_steps_at_the_end_and_at_a_better_validation(shared_synthetic_dir, tmp_path, monkeypatch):
    import fmnist.training.checkpoint

    written = []
    real_save = fmnist.training.checkpoint.save_state
    monkeypatch.setattr(fmnist.training.checkpoint, "save_state", lambda path, state: (written.append((path.name, state["step"])), real_save(path, state)))
    train(resolve_train(**FLAGS | dict(steps=12, eval_every=0), data_dir=str(shared_synthetic_dir), out=str(tmp_path / "a")),
          progress=False, log=quiet)
    assert written == [(LAST_STATE, 5), (LAST_STATE, 10), (LAST_STATE, 12)]
    written.clear()
    result = train(resolve_train(**FLAGS | dict(steps=12, eval_every=3), data_dir=str(shared_synthetic_dir), out=str(tmp_path / "b")),
                   progress=False, log=quiet)
    run = RunDir(result.run_dir)
    accuracies = [r.accuracy for r in run.evaluations("val")]
    assert [r.step for r in run.evaluations("val")] == [3, 6, 9, 12]
    better = [3 * (i + 1) for i, a in enumerate(accuracies) if a > max(accuracies[:i], default=-1)]
    assert [s for name, s in written if name == BEST_STATE] == better
    assert [s for name, s in written if name == LAST_STATE] == [5, 10, 12]
    assert load_state(run.best_state)["best_val_accuracy"] == max(accuracies)


def test_failed_checkpoint_write_keeps_the_previous_one(shared_synthetic_dir, tmp_path, monkeypatch):
    """A full disk, simulated: from the second checkpoint on, the write fails half way."""
    import fmnist.training.checkpoint

    calls = []
    real_save = torch.save

    def save_then_fail(obj, f):
        calls.append(obj["step"])
        if len(calls) == 1:
            return real_save(obj, f)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmnist.training.checkpoint.torch, "save", save_then_fail)
    lines = []
    run = RunDir(tmp_path / "run")
    result = train(resolve_train(**FLAGS | dict(steps=12, eval_every=0), data_dir=str(shared_synthetic_dir), out=str(run)),
                   progress=False, log=lines.append)
    assert calls == [5, 10, 12]
    warnings = [x for x in lines if x.startswith("warning:")]
    assert warnings == [
        f"warning: checkpoint of step 10 not written: No space left on device (errno 28); {run.last_state} still holds step 5",
        f"warning: checkpoint of step 12 not written: No space left on device (errno 28); {run.last_state} still holds step 5",
    ]
    assert load_state(run.last_state)["step"] == 5
    assert not list(run.path.glob(".*.tmp"))
    assert result.steps == 12 and run.weights_path.is_file()  # training itself went on


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(shared_synthetic_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    diverging = FLAGS | dict(lr=1e30, init="normal", checkpoint_every=1, precision="fp32", data_dir=str(shared_synthetic_dir))
    with pytest.raises(FmnistError, match=r"loss became (nan|inf) at step (\d+); lower --lr; .*last.pt holds step \2") as info:
        train(resolve_train(**diverging, out=str(run)), progress=False, log=quiet)
    state = load_state(run.last_state)
    assert str(state["step"]) in str(info.value)
    assert all(t.isfinite().all() for t in state["model"].values())
    # The checkpoint still resumes: to the same divergence, leaving it as it was.
    with pytest.raises(FmnistError, match=rf"at step {state['step']};"):
        train(resolve_train(resume=str(run)), progress=False, log=quiet)
    assert load_state(run.last_state)["step"] == state["step"]


class Exploit:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_corrupt_foreign_or_malicious_checkpoints_are_refused(shared_synthetic_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    train(resolve_train(**FLAGS | dict(steps=2), data_dir=str(shared_synthetic_dir), out=str(run)), progress=False, log=quiet)
    marker = tmp_path / "pwned"
    cases = [
        (lambda p: p.write_bytes(b"\x00garbage" * 100), "not a valid fmnist training state"),
        (lambda p: p.write_bytes(p.read_bytes()[:5000]), "not a valid fmnist training state"),
        (lambda p: torch.save({"state_dict": {"w": torch.zeros(2)}}, p), "not an fmnist training state"),
        (lambda p: torch.save({"format": "fmnist-train-state/1", "x": Exploit(marker)}, p), "not a valid fmnist training state"),
    ]
    for corrupt, message in cases:
        corrupt(run.last_state)
        with pytest.raises(FmnistError, match=message):
            train(resolve_train(resume=str(run), steps=4), progress=False, log=quiet)
    result = fmnist_cli("train", "--resume", str(run), "--steps", "4")
    assert result.returncode == 2 and result.stderr.startswith("fmnist: error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not marker.exists()
