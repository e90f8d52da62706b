from __future__ import annotations

from pathlib import Path

import pytest

from crossmodal.config import Config, ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["model.bits=32", "train.lr=0.01", "data.options.size=64"])
    assert cfg.model.bits == 32
    assert cfg.train.lr == 0.01
    assert cfg.data.options == {"size": 64}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.bitz=16", "unknown key(s) in model: bitz"),
        ("model.bits=12", "multiple of 8"),
        ("model.bits=0", "multiple of 8"),
        ("train.epochs=many", "train.epochs must be int"),
        ("train.lr=fast", "train.lr must be float"),
        ("train.mode=gpu", "train.mode must be"),
        ("color=red", "unknown key(s) in config: color"),
        ("model=3", "model must be a mapping"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["name=x", "loss.params.gamma=2.0"])
    cfg.dump(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_recipe_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.name == path.stem
