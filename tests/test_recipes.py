"""The recipe pieces of `fmnist train`: each does what it says."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet, small_config, weights, write_dataset

from fmnist import FmnistError
from fmnist.config import TrainConfig, resolve_train
from fmnist.data.augment import random_erase, random_flip, random_translate
from fmnist.inference.forward import predict_logits
from fmnist.models import build_model
from fmnist.presets import PRESETS
from fmnist.run import RunDir
from fmnist.training.checkpoint import load_state
from fmnist.training.loop import train, train_step
from fmnist.training.optim import build_optimizer, lr_at


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- augmentation


def test_translate_is_a_shift_of_each_image():
    x = torch.rand(16, 1, 28, 28)
    out = random_translate(x, gen(), pad=3, fill=-1.0)
    assert out.shape == x.shape
    padded = F.pad(x, (3, 3, 3, 3), value=-1.0)
    for i in range(16):  # each output is one of the 49 crops of its padded input
        crops = [padded[i, :, dy:dy + 28, dx:dx + 28] for dy in range(7) for dx in range(7)]
        assert any(torch.equal(out[i], c) for c in crops)
    assert not torch.equal(out, x)
    assert torch.equal(out, random_translate(x, gen(), pad=3, fill=-1.0))  # same generator, same shifts


def test_flip_mirrors_about_half():
    x = torch.rand(400, 1, 28, 28)
    out = random_flip(x, gen())
    flipped = (out == x.flip(3)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)
    assert 150 < flipped.sum() < 250


def test_erase_sets_a_rectangle_to_fill():
    x = torch.rand(64, 1, 28, 28) + 1.0  # never equal to the fill
    out = random_erase(x, gen(), p=1.0, scale=(0.1, 0.2), fill=0.0)
    erased = (out == 0).squeeze(1)
    counts = erased.flatten(1).sum(1)
    assert (counts >= 0.05 * 784).all() and (counts <= 0.3 * 784).all()
    for mask in erased:  # a rectangle: its bounding box is full
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert torch.equal(out[~erased.unsqueeze(1)], x[~erased.unsqueeze(1)])
    assert torch.equal(random_erase(x, gen(), p=0.0), x)


# ----------------------------------------------------------------------------- schedule, optimiser


def lrs(**kw):
    cfg = TrainConfig(lr=1.0, **kw)
    return [lr_at(s, cfg, 100) for s in range(100)]


def test_learning_rate_schedules():
    assert lrs() == [1.0] * 100  # the post: constant
    warm = lrs(schedule="cosine", warmup=0.1)
    assert warm[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert warm[10] == pytest.approx(1.0) and warm[-1] < 0.01
    assert all(a >= b for a, b in zip(warm[10:], warm[11:], strict=False))
    cycle = lrs(schedule="onecycle", warmup=0.25)
    assert max(cycle) == pytest.approx(1.0) and cycle.index(max(cycle)) in (24, 25)
    assert cycle[-1] == pytest.approx(1 / 75)


def test_optimizers():
    model = build_model("post")
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, weight_decay=5e-4), torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["weight_decay"] == 5e-4
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="adamw"), torch.device("cpu")), torch.optim.AdamW)
    with pytest.raises(FmnistError, match="unknown optimizer 'lamb'"):
        TrainConfig(optimizer="lamb").validate()
    with pytest.raises(FmnistError, match="unknown schedule"):
        TrainConfig(schedule="step").validate()


def test_label_smoothing_and_gradient_clipping():
    torch.manual_seed(0)
    model = build_model("post-bn")
    x, y = torch.randn(16, 1, 28, 28), torch.arange(16) % 10
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = train_step(model, optimizer, x, y, label_smoothing=0.2, grad_clip=1e-3)
    change = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True)))
    assert change <= 1e-3 * 1.0001  # lr 1, clipped norm 1e-3
    logits = torch.randn(8, 10)
    target = torch.arange(8)
    smooth = F.cross_entropy(logits, target, label_smoothing=0.2)
    manual = (0.8 * F.cross_entropy(logits, target) + 0.2 * (-logits.log_softmax(1).mean(1)).mean())
    assert smooth == pytest.approx(manual.item(), rel=1e-5)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- EMA, TTA


def test_tta_averages_flipped_logits():
    torch.manual_seed(0)
    model = build_model("post-bn").eval()
    x = torch.randn(10, 1, 28, 28)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))) / 2
    torch.testing.assert_close(predict_logits(model, x, tta=True), expected)
    assert not torch.allclose(predict_logits(model, x), expected)


def small(synthetic_dir, tmp_path, **kw):
    return small_config(synthetic_dir, tmp_path / "run", **dict(steps=15, normalize=True) | kw)


def test_ema_weights_are_saved_and_evaluated(synthetic_dir, tmp_path):
    result = train(small(synthetic_dir, tmp_path, model="post-bn", ema=0.9), progress=False, log=quiet)
    saved = weights(result.run_dir)
    state = load_state(RunDir(result.run_dir).last_state)
    raw, ema = state["model"], state["ema"]
    assert not torch.equal(saved["conv1.weight"], raw["conv1.weight"].contiguous())
    torch.testing.assert_close(saved["conv1.weight"], ema["module.conv1.weight"].contiguous())
    assert torch.equal(result.model.conv1.weight.detach().contiguous(), saved["conv1.weight"])


def test_augmented_run_keeps_labels_and_learns(synthetic_dir, tmp_path):
    cfg = small(synthetic_dir, tmp_path, model="post-bn", steps=40, translate=2, flip=True, erase=0.3,
                optimizer="adamw", schedule="onecycle", warmup=0.2, label_smoothing=0.1, tta=True)
    result = train(cfg, progress=False, log=quiet)
    assert result.test.accuracy > 0.5  # labels still match their images after augmentation


# ----------------------------------------------------------------------------- presets


# The wide ResNet's two steps take 5-20 s of a 2-core CPU: out of the fast tier.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "best" else n for n in PRESETS])
def test_presets_resolve_and_run_on_the_cpu(name, tmp_path, photo_folder):
    cfg = resolve_train(preset=name)
    cfg.validate()
    assert dataclasses.asdict(cfg)["preset"] == name
    # A few steps of every preset on the CPU (compilation off: it is tested on its own), on a
    # dataset small enough for the wide ResNet to evaluate in a moment.
    data = write_dataset(tmp_path / "fashion", n_train=64, n_test=16)
    short = dataclasses.replace(cfg, steps=2, epochs=None, batch_size=8, val_size=8, compile=False,
                                data_dir=str(data), out=str(tmp_path / name), plots=False,
                                photos=str(photo_folder) if cfg.photo_share else None)  # the photo preset's
    result = train(short, progress=False, log=quiet)
    assert 0.0 <= result.test.accuracy <= 1.0


def test_flags_override_a_preset():
    cfg = resolve_train(preset="cpu-fast", lr=0.05, epochs=1.0)
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.optimizer) == ("post-bn", 0.05, 1.0, "sgd")
    with pytest.raises(FmnistError, match="unknown preset"):
        resolve_train(preset="turbo")


@pytest.mark.slow
def test_compiled_training_matches_eager(synthetic_dir, tmp_path):
    # `fast` has no dropout, whose compiled random numbers differ from eager ones by design.
    kw = dict(model="fast", precision="fp32", steps=3, plots=False, optimizer="sgd", lr=0.01)
    eager = train(small(synthetic_dir, tmp_path / "e", **kw), progress=False, log=quiet)
    compiled = train(small(synthetic_dir, tmp_path / "c", compile=True, **kw), progress=False, log=quiet)
    # Inductor fuses batch norm and reorders its sums: the same steps up to float rounding.
    for a, b in zip(eager.model.parameters(), compiled.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    assert compiled.test.loss == pytest.approx(eager.test.loss, rel=1e-2)
