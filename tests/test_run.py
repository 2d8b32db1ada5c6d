"""The run folder's schema: model.json validated on load, metrics records, RunDir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from fmnist import FmnistError
from fmnist.data import CLASS_NAMES, Normalization
from fmnist.inference.predictor import load_model
from fmnist.models import build_model
from fmnist.run import (
    MAX_PARAMETERS,
    EndRecord,
    EvalRecord,
    LossRecord,
    ModelMeta,
    RunDir,
    record_from_json,
    record_to_json,
    written_by_step,
)


def valid_meta() -> dict:
    return ModelMeta("post", {"keep_prob": 0.75}, list(CLASS_NAMES), Normalization()).to_json()


def write_run(tmp_path, meta: dict, weights: bool = True, name: str = "run") -> RunDir:
    run = RunDir(tmp_path / name)
    run.path.mkdir(parents=True)
    run.meta_path.write_text(json.dumps(meta))
    if weights:
        save_file({k: v.contiguous() for k, v in build_model("post").state_dict().items()}, str(run.weights_path))
    return run


def test_model_meta_round_trips_through_json():
    meta = ModelMeta("fast", {}, list(CLASS_NAMES), Normalization(0.28, 0.35), tta=True, steps=7,
                     metrics={"test_accuracy": 0.9})
    again = ModelMeta.from_json(json.loads(json.dumps(meta.to_json())))
    assert again == meta and again.test_accuracy == 0.9


def test_a_valid_run_loads(tmp_path):
    predictor = load_model(write_run(tmp_path, valid_meta()).path)
    assert predictor.meta.model == "post" and predictor.class_names == list(CLASS_NAMES)


def test_old_names_still_load(tmp_path):
    meta = valid_meta() | {"model": "seed"}
    assert load_model(write_run(tmp_path, meta).path).meta.model == "post"


@pytest.mark.parametrize("change,message", [
    ({"model": "resnet9000"}, "unknown model 'resnet9000'"),
    ({"model": 3}, "'model' must be a str"),
    ({"class_names": None}, "'class_names' must be a list"),
    ({"class_names": [1, 2, 3]}, "'class_names' must be a non-empty list of strings"),
    ({"class_names": []}, "'class_names' must be a non-empty list of strings"),
    ({"normalization": {"mean": 0.0, "std": 0.0}}, "'std' must be positive"),
    ({"normalization": {"mean": 0.0, "std": float("nan")}}, "finite numbers"),
    ({"normalization": {"mean": "x", "std": 1.0}}, "finite numbers"),
    ({"model_args": {"keep_prob": 0.5, "layers": 9}}, "do not build 'post'"),
    ({"model_args": [1]}, "'model_args' must be a JSON object"),
    ({"format": "fmnist-model/9"}, "newer than this fmnist reads"),
    ({"format": "keras"}, "not an fmnist model description"),
])
def test_crafted_model_json_gives_one_clear_error(tmp_path, change, message):
    run = write_run(tmp_path, valid_meta() | change, weights=False)
    with pytest.raises(FmnistError, match=message):
        run.read_meta()


def test_missing_class_names_is_named(tmp_path):
    meta = valid_meta()
    del meta["class_names"]
    with pytest.raises(FmnistError, match="'class_names' is missing"):
        write_run(tmp_path, meta, weights=False).read_meta()


def test_billions_of_parameters_are_refused_before_allocation(tmp_path):
    """model_args that would build a network of ~10^11 parameters: refused from a model built
    on the meta device, in a process whose memory stays small."""
    meta = valid_meta() | {"model": "fast", "model_args": {"widths": [64, 100_000, 1_000_000]}}
    run = write_run(tmp_path, meta, weights=False)
    # VmHWM: the peak of this process's own memory since exec (ru_maxrss can carry a forking
    # parent's size across exec).
    code = ("import re, sys\nfrom fmnist.cli import main\nstatus = main(['evaluate', '--model', sys.argv[1]])\n"
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])\nsys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, str(run.path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"more than the limit of {MAX_PARAMETERS:,}" in result.stderr
    assert int(result.stdout.split()[-1]) < 1_500_000  # KiB: far from the 400 GB the weights would take


def test_not_json_and_not_a_folder(tmp_path):
    run = write_run(tmp_path, valid_meta(), weights=False)
    run.meta_path.write_text("{not json")
    with pytest.raises(FmnistError, match="not readable JSON"):
        run.read_meta()
    with pytest.raises(FmnistError, match="no such run folder"):
        RunDir(tmp_path / "nowhere").read_meta()


def test_weights_that_do_not_fit_are_named(tmp_path):
    run = write_run(tmp_path, valid_meta() | {"model": "post-bn"})
    with pytest.raises(FmnistError, match="weights do not fit model 'post-bn'"):
        load_model(run.path)


# ----------------------------------------------------------------------------- records


def test_records_keep_their_json_shape():
    assert record_to_json(LossRecord(3, 0.5, 1e-3)) == {"step": 3, "loss": 0.5, "lr": 1e-3}
    evaluation = EvalRecord(10, "val", 0.9, 0.3, 1.5, 0.1)
    assert list(record_to_json(evaluation)) == ["step", "split", "accuracy", "loss", "train_seconds", "eval_seconds"]
    for record in (LossRecord(3, 0.5, 1e-3), evaluation, EndRecord(10, 2.0)):
        assert record_from_json(record_to_json(record)) == record
    with pytest.raises(FmnistError, match="LossRecord without 'lr'"):
        record_from_json({"step": 1, "loss": 0.1})
    with pytest.raises(FmnistError, match="not a JSON object"):
        record_from_json([1, 2])


def test_a_checkpoint_after_n_steps_covers_losses_before_n_and_evaluations_at_n():
    assert written_by_step(LossRecord(4, 0.1, 0.1), 5) and not written_by_step(LossRecord(5, 0.1, 0.1), 5)
    assert written_by_step(EvalRecord(5, "val", 1, 0, 0, 0), 5) and not written_by_step(EndRecord(6, 0), 5)


# ----------------------------------------------------------------------------- the folder


def test_create_refuses_a_folder_holding_a_run(tmp_path):
    run = RunDir.create(tmp_path / "r", "post")
    run.metrics_path.write_text("")
    with pytest.raises(FmnistError, match="already holds a run; choose another --out"):
        RunDir.create(tmp_path / "r", "post")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FmnistError, match="exists and is not a folder"):
        RunDir.create(tmp_path / "file", "post")


def test_latest_is_the_newest_model(tmp_path):
    import os
    import time

    for name, age in (("old", 100), ("new", 0)):
        run = write_run(tmp_path / "runs", valid_meta(), name=name)
        os.utime(run.meta_path, (time.time() - age, time.time() - age))
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "untrained").mkdir()
    assert RunDir.latest(tmp_path / "runs").path.name == "new"
    with pytest.raises(FmnistError, match="no trained model under"):
        RunDir.latest(tmp_path / "untrained")


def test_metrics_are_read_as_records(tmp_path):
    run = RunDir.create(tmp_path / "r", "post")
    lines = [LossRecord(0, 2.3, 1e-3), LossRecord(1, 2.0, 1e-3), EvalRecord(2, "val", 0.5, 1.0, 0.2, 0.01),
             EndRecord(2, 0.3)]
    run.metrics_path.write_text("".join(json.dumps(record_to_json(r)) + "\n" for r in lines))
    assert run.read_metrics() == lines
    assert [r.step for r in run.losses()] == [0, 1] and run.evaluations("val")[0].accuracy == 0.5
    run.metrics_path.write_text('{"step": 0, "loss": 2.3, "lr": 0.001}\nnot json\n')
    with pytest.raises(FmnistError, match="line 2 is not JSON"):
        run.read_metrics()


def test_models_registered_build_on_the_meta_device_without_memory():
    with torch.device("meta"):
        model = build_model("wrn-28-10")
    assert next(model.parameters()).device.type == "meta"
