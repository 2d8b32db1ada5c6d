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
