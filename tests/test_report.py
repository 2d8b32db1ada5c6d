"""`fmnist report`: the ladder of runs and its report."""

from dataclasses import replace

import pytest
from helpers import quiet

from fmnist import report
from fmnist.cli import main
from fmnist.presets import preset
from fmnist.report import Rung
from fmnist.run import RunDir


@pytest.fixture
def tiny_ladder(monkeypatch):
    """The real ladder's changes, each run cut to a few steps on small batches."""
    real = report.ladder

    def short(quick, include_best):
        rungs = real(quick, include_best)
        return [replace(r, overrides=r.overrides | {"steps": 6, "epochs": None, "batch_size": 16,
                                                    "val_size": 32, "log_every": 3}) for r in rungs]

    monkeypatch.setattr(report, "ladder", short)


@pytest.mark.slow  # 7 runs with their plots: ~15 s, out of the fast tier
def test_report_trains_each_rung_and_reuses_them(tiny_ladder, synthetic_dir, tmp_path):
    out = tmp_path / "ladder"
    path = report.run_ladder(out, data_dir=str(synthetic_dir), progress=False, log=quiet)
    text = path.read_text()
    names = [r.name for r in report.ladder(False, False)]
    assert len(names) == 7
    for name in names:
        assert f"[{name}]({name}/)" in text
        config = RunDir(out / name).read_config()
        assert config["out"] == str(out / name)
    assert RunDir(out / "01-post").read_config()["init"] == "normal"
    last = RunDir(out / "07-ema").read_config()
    assert (last["model"], last["translate"], last["flip"], last["tta"]) == ("post-bn", 2, True, True)
    assert last["ema"] > 0 and last["schedule"] == "onecycle"
    for image in ("ladder_accuracy.png", "ladder_loss.png"):
        assert (out / image).read_bytes()[:4] == b"\x89PNG"

    before = {n: RunDir(out / n).weights_path.stat().st_mtime_ns for n in names}
    logs = []
    report.run_ladder(out, data_dir=str(synthetic_dir), progress=False, log=logs.append)
    assert sum("reusing" in line for line in logs) == 7
    assert before == {n: RunDir(out / n).weights_path.stat().st_mtime_ns for n in names}


def test_the_full_ladder_ends_at_the_cpu_fast_preset_or_beyond_it():
    """Every field the cpu-fast preset sets is reached by some rung of the full ladder with the
    preset's value, so the ladder shows how that recipe is made."""
    reached = {}
    for rung in report.ladder(False, False):
        reached |= rung.overrides
        if all(reached.get(k) == v for k, v in preset("cpu-fast").items()):
            break
    else:
        raise AssertionError("no rung holds the cpu-fast preset's recipe")


def test_the_quick_ladder_keeps_the_rungs_that_show_at_its_length():
    quick, full = report.ladder(True, False), report.ladder(False, False)
    assert [r.name for r in quick] == [r.name for r in full if r.quick]
    assert quick[-1].overrides["epochs"] == report.QUICK_EPOCHS
    assert all(r.caveat for r in full if not r.quick)  # the report says why each is left out


def test_the_report_says_why_a_rung_fell():
    rungs = [Rung("01-a", "a", {}), Rung("02-b", "b", {}, caveat="b needs longer"), Rung("03-c", "c", {})]
    summaries = [{"val": 0.90, "accuracy": 0.89}, {"val": 0.91, "accuracy": 0.88}, {"val": 0.90, "accuracy": 0.90}]
    text = "\n".join(report._falls(rungs, summaries))
    assert "**02-b** is below the rung before on test (-1.00): b needs longer" in text
    assert "**03-c** is below the rung before on validation (-1.00)" in text and "seed" in text


def test_report_retrains_only_rungs_whose_recipe_changed(monkeypatch, synthetic_dir, tmp_path):
    """Another device or data folder reuses a finished rung; a changed recipe retrains it and
    keeps the earlier run aside."""
    rungs = [Rung("01-a", "first", {"steps": 4, "batch_size": 16, "val_size": 32, "log_every": 2}),
             Rung("02-b", "second", {"lr": 0.002})]
    monkeypatch.setattr(report, "ladder", lambda quick, include_best: list(rungs))
    monkeypatch.setattr(report, "write_report", lambda out, *_: out / "report.md")
    out = tmp_path / "ladder"
    report.run_ladder(out, data_dir=str(synthetic_dir), device="cpu", progress=False, log=quiet)
    mtimes = {r.name: RunDir(out / r.name).weights_path.stat().st_mtime_ns for r in rungs}

    # A rung trained before an option existed: its saved config lacks it, and the option's
    # default trains as before, so the rung is still reused.
    first = RunDir(out / "01-a")
    meta = first.read_meta()
    del meta.config["photo_balance"]
    first.write_meta(meta)

    moved = tmp_path / "moved-data"
    synthetic_dir.rename(moved)
    logs = []
    report.run_ladder(out, data_dir=str(moved), device="auto", progress=False, log=logs.append)
    assert sum("reusing" in line for line in logs) == 2
    assert mtimes == {r.name: RunDir(out / r.name).weights_path.stat().st_mtime_ns for r in rungs}

    rungs[1] = Rung("02-b", "second", {"lr": 0.003})
    logs = []
    report.run_ladder(out, data_dir=str(moved), device="cpu", progress=False, log=logs.append)
    assert RunDir(out / "01-a").weights_path.stat().st_mtime_ns == mtimes["01-a"]
    assert RunDir(out / "02-b").read_meta().config["lr"] == 0.003
    kept = list(out.glob("02-b.replaced-*"))
    assert len(kept) == 1 and RunDir(kept[0]).read_meta().config["lr"] == 0.002
    assert any("its recipe changed" in line for line in logs)


def test_report_refuses_a_file_as_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["report", "--out", str(tmp_path / "f"), "--quick", "--quiet"]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_report_on_real_data_climbs(tmp_path, data_dir):
    """The --quick ladder on the real data: every rung above the one before, on validation and
    test, and the top one far above the post."""
    assert main(["report", "--quick", "--out", str(tmp_path / "ladder"), "--quiet"]) == 0
    names = [r.name for r in report.ladder(True, False)]
    metas = [RunDir(tmp_path / "ladder" / name).read_meta() for name in names]
    test = [m.test_accuracy for m in metas]
    val = [m.metrics["val_accuracy"] for m in metas]
    assert 0.78 <= test[0] <= 0.86
    assert test == sorted(test) and val == sorted(val)
    assert test[-1] >= 0.91 and test[-1] > test[0] + 0.08
    assert "is below the rung before" not in (tmp_path / "ladder" / "report.md").read_text()
