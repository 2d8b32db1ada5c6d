import pytest
import torch
from helpers import assert_same_run, quiet, small_config, weights

from fmnist import FmnistError
from fmnist.data import BatchSampler, Normalization
from fmnist.run import (
    CONFIG_FILE,
    META_FILE,
    METRICS_FILE,
    PLOT_FILES,
    WEIGHTS_FILE,
    RunDir,
    load_network,
)
from fmnist.training.loop import train


def test_run_folder_contents(synthetic_dir, tmp_path):
    result = train(small_config(synthetic_dir, tmp_path / "run", plots=True), progress=False, log=quiet)
    run = RunDir(result.run_dir)
    # The names other tools rely on.
    assert (CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, META_FILE) == ("config.json", "metrics.jsonl", "model.safetensors", "model.json")
    assert PLOT_FILES == ("cost.png", "samples.png", "confusion_matrix.png", "misclassified.png")
    for path in (run.config_path, run.metrics_path, run.weights_path, run.meta_path, *run.plot_paths()):
        assert path.is_file(), path.name
    config = run.read_config()
    assert config["steps"] == 12 and config["lr"] == 0.001
    assert [r.step for r in run.losses()] == list(range(12))
    assert {r.split for r in run.evaluations()} == {"val", "test"}
    meta = run.read_meta()
    assert meta.model == "post" and len(meta.class_names) == 10
    assert meta.normalization == Normalization(mean=0.0, std=1.0)
    assert meta.test_accuracy == pytest.approx(result.test.accuracy)
    assert (run / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_numbers(synthetic_dir, tmp_path):
    a = train(small_config(synthetic_dir, tmp_path / "a"), progress=False, log=quiet)
    b = train(small_config(synthetic_dir, tmp_path / "b"), progress=False, log=quiet)
    c = train(small_config(synthetic_dir, tmp_path / "c", seed=1), progress=False, log=quiet)
    assert_same_run(a.run_dir, b.run_dir)  # weights and metrics
    wa, wc = weights(a.run_dir), weights(c.run_dir)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_saved_model_reproduces_its_accuracy(synthetic_dir, tmp_path):
    from fmnist.evaluate import evaluate_run

    result = train(small_config(synthetic_dir, tmp_path / "r", steps=40, normalize=True), progress=False, log=quiet)
    assert result.test.accuracy > 0.5  # the synthetic classes are easy
    model, meta = load_network(result.run_dir)
    assert not model.training
    assert evaluate_run(result.run_dir, synthetic_dir).accuracy == pytest.approx(result.test.accuracy)


def test_epochs_override_steps(synthetic_dir, tmp_path):
    result = train(small_config(synthetic_dir, tmp_path / "e", epochs=2.0), progress=False, log=quiet)
    assert result.steps == 2 * (640 - 64) // 32


def test_refuses_to_overwrite_a_run(synthetic_dir, tmp_path):
    train(small_config(synthetic_dir, tmp_path / "r"), progress=False, log=quiet)
    run = RunDir(tmp_path / "r")
    before = run.weights_path.read_bytes()
    with pytest.raises(FmnistError, match="already holds a run"):
        train(small_config(synthetic_dir, tmp_path / "r"), progress=False, log=quiet)
    assert run.weights_path.read_bytes() == before


def test_final_weights_that_are_not_finite_are_not_saved(synthetic_dir, tmp_path, monkeypatch):
    """The last step breaks the weights after its loss, a finite one, was computed."""
    import fmnist.training.loop

    real_step, cfg, steps = fmnist.training.loop.train_step, small_config(synthetic_dir, tmp_path / "r"), []

    def last_step_breaks(model, optimizer, *args, **kwargs):
        loss = real_step(model, optimizer, *args, **kwargs)
        steps.append(1)
        if len(steps) == cfg.steps:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))
        return loss

    monkeypatch.setattr(fmnist.training.loop, "train_step", last_step_breaks)
    with pytest.raises(FmnistError, match=r"final weights are not finite \(.* holds NaN or infinity\); the model was not saved"):
        train(cfg, progress=False, log=quiet)
    assert not RunDir(tmp_path / "r").weights_path.exists() and not RunDir(tmp_path / "r").meta_path.exists()


def test_a_run_folder_is_locked_while_training(tmp_path):
    run = RunDir.create(tmp_path / "r", "post")
    with pytest.raises(FmnistError, match="another fmnist process is training this run"):
        RunDir(tmp_path / "r").lock()
    run.unlock()
    RunDir(tmp_path / "r").lock().unlock()


def test_default_run_folders_are_unique(tmp_path, monkeypatch):
    """Two runs of the same model started in the same second get two folders."""
    import datetime

    import fmnist.run

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(fmnist.run, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first, second = RunDir.create(None, "post"), RunDir.create(None, "post")
    assert (str(first), str(second)) == ("runs/20260102-030405-post", "runs/20260102-030405-post-2")


def test_diverging_loss_stops_with_the_step(synthetic_dir, tmp_path):
    with pytest.raises(FmnistError, match=r"loss became (nan|inf) at step \d+"):
        train(small_config(synthetic_dir, tmp_path / "r", lr=1e30, init="normal", steps=30, log_every=1),
              progress=False, log=quiet)


def test_sampler_covers_each_epoch_and_wraps_like_next_batch():
    sampler = BatchSampler(10, 4, seed=0, device=torch.device("cpu"))
    first_epoch_perm = sampler.perm.clone()
    batches = [sampler.next() for _ in range(5)]  # 20 indices: two full epochs
    flat = torch.cat(batches)
    assert torch.equal(flat[:10], first_epoch_perm)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert len(batches[2]) == 4  # the batch crossing the epoch end is still full
    assert sampler.epoch == 2
