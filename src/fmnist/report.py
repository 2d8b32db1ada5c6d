"""The ladder from the post to the best recipe, one change at a time: each rung is a training
run, and the report shows what each change bought in accuracy and time.

    fmnist report --quick            # a few minutes on a laptop CPU: short runs
    fmnist report                    # the full ladder (the cpu-fast preset's length per rung)
    fmnist report --out reports/ladder --include-best   # and the wide ResNet (for a GPU)

Runs already in the report folder with the same recipe are reused (whatever device or data
folder they ran with), so an interrupted report picks up where it stopped; a finished run whose
recipe changed is moved aside, never deleted.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fmnist import FmnistError
from fmnist.config import TrainConfig, recipe, to_dict
from fmnist.io import atomic_open
from fmnist.presets import preset
from fmnist.run import RunDir
from fmnist.training.loop import train


@dataclass(frozen=True)
class Rung:
    name: str  # short id, also the run folder's name
    change: str  # what this rung adds to the one before, for the report
    overrides: dict  # config fields set on top of the previous rung's
    caveat: str = ""  # why the change can cost accuracy; the report says it where it did
    quick: bool = True  # in the --quick ladder (False: the change needs the full length to show)


# The length of the schedule rung and everything after it, in epochs, in the quick setting.
QUICK_EPOCHS = 3.0


def ladder(quick: bool, include_best: bool) -> list[Rung]:
    """The rungs in order; each inherits every change above it. The quick ladder keeps the
    rungs whose change shows at its short length."""
    epochs = QUICK_EPOCHS if quick else preset("cpu-fast")["epochs"]
    rungs = [
        Rung("01-post", "the post: N(0, 1) initialisation, Adam 1e-3, batch 128, 500 steps", {"init": "normal"}),
        Rung("02-init", "PyTorch's initialisation (scaled to each layer's fan-in)", {"init": "default"}),
        Rung("03-batchnorm", "batch normalisation and standardised inputs", {"model": "post-bn", "normalize": True}),
        Rung("04-schedule", f"{epochs:g} epochs of SGD with Nesterov momentum, one-cycle schedule, "
             "weight decay, label smoothing",
             {"epochs": epochs, "batch_size": 256, "optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4,
              "schedule": "onecycle", "warmup": 0.15, "label_smoothing": 0.1}),
        Rung("05-shifts", "augmentation: each image shifted by up to 2 pixels", {"translate": 2}, quick=False,
             caveat="a shifted image is harder to fit than the image itself; at a few epochs the network has "
                    "not yet fit the images as they are, and augmentation costs accuracy there"),
        Rung("06-mirror", "mirror images: half the training images mirrored, and each test image averaged "
             "with its mirror image (the cpu-fast preset's recipe)", {"flip": True, "tta": True}, quick=False,
             caveat="sandals, sneakers and ankle boots face the same way in 92-100% of Fashion-MNIST's images, "
                    "training and test alike, so a mirrored shoe is an image the test set never shows; in three "
                    "runs of 17 epochs, each holding out other validation images, mirroring added 0.08 to 0.40 "
                    "points on validation and lost 0.03 to 0.17 on test"),
        Rung("07-ema", "an exponential moving average of the weights, evaluated and saved", {"ema": 0.998},
             quick=False,
             caveat="the one-cycle schedule already brings the learning rate to zero, so the last weights have "
                    "settled, and the average still carries older, worse ones"),
    ]
    if quick:
        rungs = [r for r in rungs if r.quick]
    if include_best:
        best = {k: v for k, v in preset("best").items() if k != "epochs"}
        rungs.append(Rung("08-wide-resnet", "a wide ResNet with random erasing (the best preset's recipe)",
                          best | {"epochs": epochs if quick else preset("best")["epochs"]}))
    return rungs


def rung_configs(rungs: list[Rung], out: Path, **common) -> list[TrainConfig]:
    values: dict = {}
    configs = []
    for rung in rungs:
        values |= rung.overrides
        configs.append(TrainConfig(**(values | common | {"out": str(out / rung.name)})))
    return configs


def _finished(cfg: TrainConfig) -> bool:
    """Whether the rung's run folder holds a finished run of this config's recipe."""
    run = RunDir(cfg.out)
    if not run.meta_path.is_file():
        return False
    try:
        return recipe(run.read_meta().config) == recipe(to_dict(cfg))
    except FmnistError:  # an unreadable or outdated model.json: train the rung again
        return False


def _clear(cfg: TrainConfig, log) -> None:
    """Make room for the rung: an unfinished run of it is removed, a finished run of another
    recipe moved aside; neither while another process trains it."""
    run = RunDir(cfg.out)
    if not run.path.is_dir():
        return  # nothing there, or a file, which RunDir.create refuses
    run.lock()
    try:
        if run.has_model():
            aside = run.path.with_name(f"{run.path.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
            run.path.rename(aside)
            log(f"{run}: its recipe changed; the earlier run is kept in {aside}")
        else:
            shutil.rmtree(run.path)  # an interrupted run of this rung
    finally:
        run.unlock()


def run_ladder(out, quick: bool = False, include_best: bool = False, data_dir=None, device: str = "auto",
               progress: bool = True, log=print) -> Path:
    """Train (or reuse) every rung, then write report.md with its plots into `out`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FmnistError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    rungs = ladder(quick, include_best)
    configs = rung_configs(rungs, out, data_dir=data_dir, device=device, plots=True)
    for i, (rung, cfg) in enumerate(zip(rungs, configs, strict=True), 1):
        if _finished(cfg):
            log(f"[{i}/{len(rungs)}] {rung.name}: reusing {cfg.out}")
            continue
        _clear(cfg, log)
        log(f"[{i}/{len(rungs)}] {rung.name}: {rung.change}")
        train(cfg, progress=progress, log=log)
    return write_report(out, rungs, configs, quick)


def _run_summary(run: RunDir) -> dict:
    meta = run.read_meta()
    return {"accuracy": meta.test_accuracy, "val": meta.metrics.get("val_accuracy"),
            "seconds": meta.train_seconds, "steps": meta.steps,
            "losses": [(r.step, r.loss) for r in run.losses()], "batch": meta.config["batch_size"]}


def _percent(accuracy: float | None) -> str:
    return "" if accuracy is None else f"{100 * accuracy:.2f}%"


def _gain(now: float | None, before: float | None) -> str:
    return "" if now is None or before is None else f"{100 * (now - before):+.2f}"


def _falls(rungs: list[Rung], summaries: list[dict]) -> list[str]:
    """A paragraph for each rung below the one before it, on either split, saying why."""
    lines = []
    for i in range(1, len(rungs)):
        rung, s, before = rungs[i], summaries[i], summaries[i - 1]
        fell = [f"{split} ({_gain(s[key], before[key])})" for split, key in (("validation", "val"), ("test", "accuracy"))
                if s[key] is not None and before[key] is not None and s[key] < before[key]]
        if fell:
            why = rung.caveat or "one run per rung: a difference this small can be the seed's"
            lines += ["", f"**{rung.name}** is below the rung before on {' and '.join(fell)}: {why}"]
    return lines


def write_report(out: Path, rungs: list[Rung], configs: list[TrainConfig], quick: bool) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summaries = [_run_summary(RunDir(cfg.out)) for cfg in configs]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for rung, s in zip(rungs, summaries, strict=True):
        steps, losses = np.asarray(s["losses"]).T
        images = steps * s["batch"] / 1000  # thousands of images seen, comparable across batch sizes
        k = max(1, len(losses) // 100)  # smooth each curve over about 1% of its run
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(images[k - 1:], smooth, label=rung.name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("training images seen (thousands)")
    ax.set_ylabel("training loss (batch mean, smoothed)")
    ax.set_title("Training loss of each rung")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    with atomic_open(out / "ladder_loss.png") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    accs = [100 * s["accuracy"] for s in summaries]
    ax.barh([r.name for r in rungs][::-1], accs[::-1], color="tab:blue")
    for y, a in enumerate(accs[::-1]):
        ax.text(a + 0.1, y, f"{a:.2f}%", va="center", fontsize=8)
    ax.set_xlim(min(accs) - 3, max(accs) + 2)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title("Test accuracy up the ladder")
    with atomic_open(out / "ladder_accuracy.png") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    lines = [
        "# From the post to the state of the art, one change at a time",
        "",
        "Each rung keeps every change above it and adds one." + (f" Quick setting: {QUICK_EPOCHS:g} epochs from the "
                                                                 "schedule rung on." if quick else ""),
        "Choices are made on the validation split (images held out of the training file); the 10,000 test "
        "images' accuracy is reported beside it. One run per rung.",
        "",
        "| rung | change | validation | gain | test | gain | training s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rung, s, before in zip(rungs, summaries, [{}, *summaries], strict=False):
        lines.append(f"| [{rung.name}]({rung.name}/) | {rung.change} | {_percent(s['val'])} | "
                     f"{_gain(s['val'], before.get('val'))} | {_percent(s['accuracy'])} | "
                     f"{_gain(s['accuracy'], before.get('accuracy'))} | {s['seconds']:.1f} |")
    lines += _falls(rungs, summaries)
    if quick:
        left = [r for r in ladder(False, False) if not r.quick]
        lines += ["", "Left out of the quick ladder, because at its length they cost accuracy rather than show "
                  "what they are worth; `fmnist report` runs them at the cpu-fast preset's length: "
                  + "; ".join(f"{r.name} ({r.change})" for r in left) + "."]
    lines += ["", "![test accuracy](ladder_accuracy.png)", "", "![training loss](ladder_loss.png)", ""]
    for rung in rungs:
        lines += [f"## {rung.name}", "", rung.change, "",
                  f"config: [{rung.name}/config.json]({rung.name}/config.json)", "",
                  f"![cost]({rung.name}/cost.png) ![confusion]({rung.name}/confusion_matrix.png)", ""]
    path = out / "report.md"
    with atomic_open(path, "w") as f:
        f.write("\n".join(lines))
    return path

