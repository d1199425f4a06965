import pytest

from unbackdoor import config as C
from unbackdoor.defend import resolve
from unbackdoor.schema import DefendConfig, TrainConfig


def test_build_coerces_types_and_enums():
    cfg = C.build(TrainConfig, {"lr": "3e-4", "batch_size": "2", "scheduler": "linear", "progress": "false"})
    assert cfg.lr == pytest.approx(3e-4) and cfg.batch_size == 2 and cfg.scheduler.value == "linear"
    assert cfg.progress is False


def test_unknown_key_suggests_close_match_and_lists_valid_keys():
    with pytest.raises(C.ConfigError) as err:
        C.build(TrainConfig, {"lrr": 1e-3})
    msg = str(err.value)
    assert err.value.problems[0][0] == "lrr"  # the location is the key itself (no section above it here)
    assert "lrr" in msg and "Did you mean 'lr'" in msg and "batch_size" in msg


def test_all_errors_reported_at_once():
    data = {"method": {"name": "finetune"}, "model": {"path": "m", "dtype": "float33"},
            "train": {"lr": -1, "batch_size": "two", "grad_acum": 2}, "output": {"dir": "o"}}
    with pytest.raises(C.ConfigError) as err:
        resolve(data)
    locs = [loc for loc, _ in err.value.problems]
    assert "model.dtype" in locs and "train.batch_size" in locs and "train.grad_acum" in locs
    assert "did you mean 'float32'" in str(err.value)


def test_value_validation_names_field_and_fix():
    data = {"method": {"name": "finetune"}, "model": {"path": "m"}, "train": {"lr": -1}, "output": {"dir": "o"}}
    with pytest.raises(C.ConfigError) as err:
        resolve(data)
    assert ("train.lr", "must be > 0, got -1.0") in err.value.problems


def test_unknown_method_name():
    with pytest.raises(C.ConfigError) as err:
        resolve({"method": {"name": "finetun"}, "model": {"path": "m"}, "output": {"dir": "o"}})
    assert "Did you mean 'finetune'" in str(err.value)


def test_overrides_are_dotted_and_typed():
    data = C.apply_overrides({"train": {"lr": 1.0}, "model": {"path": "m"}, "output": {"dir": "o"}},
                             ["train.lr=2e-5", "train.betas=[0.9, 0.95]", "seed=3"])
    cfg = C.build(DefendConfig, data)
    assert cfg.train.lr == pytest.approx(2e-5) and cfg.train.betas == [0.9, 0.95] and cfg.seed == 3
    with pytest.raises(C.ConfigError):
        C.apply_overrides({}, ["no_equals_sign"])


def test_yaml_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_yaml(p)
    assert f"{p}:" in str(err.value)
