import pytest

from fmnist import FmnistError
from fmnist.config import TrainConfig, resolve


def test_defaults_are_the_posts():
    cfg = TrainConfig()
    assert (cfg.model, cfg.lr, cfg.batch_size, cfg.steps, cfg.keep_prob) == ("post", 0.001, 128, 500, 0.75)


@pytest.mark.parametrize("suffix,text", [
    (".toml", 'lr = 0.01\nsteps = 50\nmodel = "post"\nnormalize = true\n'),
    (".yaml", "lr: 0.01\nsteps: 50\nmodel: post\nnormalize: true\n"),
])
def test_file_overrides_defaults_and_flags_override_file(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    cfg = resolve(TrainConfig, path)
    assert (cfg.lr, cfg.steps, cfg.normalize, cfg.batch_size) == (0.01, 50, True, 128)
    cfg = resolve(TrainConfig, path, steps=7, lr=None)
    assert (cfg.lr, cfg.steps) == (0.01, 7)


def test_int_is_accepted_for_float(tmp_path):
    (tmp_path / "c.toml").write_text("lr = 1\n")
    cfg = resolve(TrainConfig, tmp_path / "c.toml")
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


@pytest.mark.parametrize("text,message", [
    ("learning_rate = 0.1\n", "unknown config field 'learning_rate'"),
    ('steps = "many"\n', "config field 'steps': expected int"),
    ("normalize = 1\n", "config field 'normalize': expected bool"),
    ("steps = = 3\n", "invalid config"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(FmnistError, match=message):
        resolve(TrainConfig, path)


@pytest.mark.parametrize("text", ["1: 2\n", "[steps]: 3\n", "? !!python/none\n: 3\n"])
def test_yaml_keys_that_are_not_names(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(FmnistError, match="keys must be field names|invalid config"):
        resolve(TrainConfig, path)


def test_missing_and_unsupported_config(tmp_path):
    with pytest.raises(FmnistError, match="cannot read config"):
        resolve(TrainConfig, tmp_path / "none.toml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(FmnistError, match="must be .toml, .yaml"):
        resolve(TrainConfig, tmp_path / "c.ini")


# Every value a number flag refuses, with the line that says so: the flag and the allowed range.
OUT_OF_RANGE = [
    (dict(lr=-1.0), "--lr must be > 0, got -1"),
    (dict(lr=0.0), "--lr must be > 0, got 0"),
    (dict(lr=float("nan")), "--lr must be a finite number > 0, got nan"),
    (dict(epochs=float("inf")), "--epochs must be a finite number > 0, got inf"),
    (dict(keep_prob=0.0), r"--keep-prob must be in \(0, 1\], got 0"),
    (dict(keep_prob=1.5), r"--keep-prob must be in \(0, 1\], got 1.5"),
    (dict(momentum=-3.0), r"--momentum must be in \[0, 1\), got -3"),
    (dict(weight_decay=-1.0), "--weight-decay must be >= 0, got -1"),
    (dict(steps=0), "--steps must be >= 1, got 0"),
    (dict(epochs=0.0), "--epochs must be > 0, got 0"),
    (dict(batch_size=0), "--batch-size must be >= 1, got 0"),
    (dict(warmup=1.0), r"--warmup must be in \[0, 1\), got 1"),
    (dict(label_smoothing=-0.1), r"--label-smoothing must be in \[0, 1\), got -0.1"),
    (dict(ema=1.0), r"--ema must be in \[0, 1\), got 1"),
    (dict(erase=2.0), r"--erase must be in \[0, 1\], got 2"),
    (dict(translate=28), r"--translate must be in \[0, 27\], got 28"),
    (dict(grad_clip=-1.0), "--grad-clip must be >= 0, got -1"),
    (dict(seed=-1), r"--seed must be in \[0, 4294967295\], got -1"),
    (dict(val_size=-1), "--val-size must be >= 0, got -1"),
    (dict(log_every=0), "--log-every must be >= 1, got 0"),
    (dict(eval_every=-5), "--eval-every must be >= 0, got -5"),
    (dict(threads=-1), "--threads must be >= 0, got -1"),
    (dict(checkpoint_every=-1), "--checkpoint-every must be >= 0, got -1"),
    (dict(nproc=0), "--nproc must be >= 1, got 0"),
]


@pytest.mark.parametrize("values,message", OUT_OF_RANGE, ids=[next(iter(v)) + "=" + str(next(iter(v.values())))
                                                             for v, _ in OUT_OF_RANGE])
def test_numbers_outside_their_range_are_refused_naming_flag_and_range(values, message):
    with pytest.raises(FmnistError, match=f"^{message}$"):
        TrainConfig(**values).validate()


def test_edges_of_the_ranges_are_accepted():
    TrainConfig(keep_prob=1.0, momentum=0.0, weight_decay=0.0, warmup=0.0, erase=1.0, translate=27,
                seed=4294967295, val_size=0, threads=0, checkpoint_every=0, lr=1e-9, epochs=0.01).validate()


def test_serve_config_ranges_and_choices():
    from fmnist.serve.config import ServeConfig

    ServeConfig(port=0, threads=0).validate()
    for values, message in [(dict(port=70000), r"--port must be in \[0, 65535\], got 70000"),
                            (dict(max_batch=0), "--max-batch must be >= 1, got 0"),
                            (dict(log_level="loud"), "unknown log level 'loud'; choose from: critical")]:
        with pytest.raises(FmnistError, match=message):
            ServeConfig(**values).validate()


def test_every_number_field_declares_its_range():
    """So that no new numeric flag slips in unchecked."""
    from dataclasses import fields

    from fmnist.config import field_type
    from fmnist.serve.config import ServeConfig

    for cls in (TrainConfig, ServeConfig):
        for f in fields(cls):
            if field_type(cls, f.name)[0] in (int, float):
                assert f.metadata["within"] is not None, f"{cls.__name__}.{f.name} has no `within=` range"
