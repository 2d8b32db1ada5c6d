import json

import pytest
import torch
from safetensors.torch import load_file

from fmnist import FmnistError
from fmnist.checkpoint import load_model
from fmnist.config import TrainConfig
from fmnist.train import BatchSampler, train


def small_config(data_dir, out, **overrides) -> TrainConfig:
    values = dict(steps=12, batch_size=32, val_size=64, log_every=5, data_dir=str(data_dir), out=str(out), plots=False)
    return TrainConfig(**(values | overrides))


def quiet(*_):
    pass


def test_run_folder_contents(synthetic_dir, tmp_path):
    result = train(small_config(synthetic_dir, tmp_path / "run", plots=True), progress=False, log=quiet)
    run = result.run_dir
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "model.json",
                 "cost.png", "samples.png", "confusion_matrix.png", "misclassified.png"):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 12 and config["lr"] == 0.001
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r and "split" not in r]
    assert [r["step"] for r in losses] == list(range(12))
    assert {r["split"] for r in records if "split" in r} == {"val", "test"}
    meta = json.loads((run / "model.json").read_text())
    assert meta["model"] == "seed" and len(meta["class_names"]) == 10
    assert meta["normalization"] == {"mean": 0.0, "std": 1.0}
    assert meta["metrics"]["test_accuracy"] == pytest.approx(result.test.accuracy)
    assert (run / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_numbers(synthetic_dir, tmp_path):
    a = train(small_config(synthetic_dir, tmp_path / "a"), progress=False, log=quiet)
    b = train(small_config(synthetic_dir, tmp_path / "b"), progress=False, log=quiet)
    c = train(small_config(synthetic_dir, tmp_path / "c", seed=1), progress=False, log=quiet)
    wa, wb, wc = (load_file(r.run_dir / "model.safetensors") for r in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    lines = lambda r: [line for line in (r.run_dir / "metrics.jsonl").read_text().splitlines() if "train_seconds" not in line]  # noqa: E731
    assert lines(a) == lines(b)


def test_saved_model_reproduces_its_accuracy(synthetic_dir, tmp_path):
    from fmnist.evaluate import evaluate_run

    result = train(small_config(synthetic_dir, tmp_path / "r", steps=40, normalize=True), progress=False, log=quiet)
    assert result.test.accuracy > 0.5  # the synthetic classes are easy
    model, meta = load_model(result.run_dir)
    assert not model.training
    assert evaluate_run(result.run_dir, synthetic_dir).accuracy == pytest.approx(result.test.accuracy)


def test_epochs_override_steps(synthetic_dir, tmp_path):
    result = train(small_config(synthetic_dir, tmp_path / "e", epochs=2.0), progress=False, log=quiet)
    assert result.steps == 2 * (640 - 64) // 32


def test_refuses_to_overwrite_a_run(synthetic_dir, tmp_path):
    train(small_config(synthetic_dir, tmp_path / "r"), progress=False, log=quiet)
    before = (tmp_path / "r" / "model.safetensors").read_bytes()
    with pytest.raises(FmnistError, match="already holds a run"):
        train(small_config(synthetic_dir, tmp_path / "r"), progress=False, log=quiet)
    assert (tmp_path / "r" / "model.safetensors").read_bytes() == before


def test_diverging_loss_stops_with_the_step(synthetic_dir, tmp_path):
    with pytest.raises(FmnistError, match=r"loss became (nan|inf) at step \d+"):
        train(small_config(synthetic_dir, tmp_path / "r", lr=1e30, init="seed", steps=30, log_every=1),
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
