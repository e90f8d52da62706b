from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from crossmodal.config import (
    SPLIT_SIZE_KEYS,
    Config,
    ConfigError,
    load_config,
    settings_differences,
    training_settings,
)
from crossmodal.data import DATASETS, list_datasets
from crossmodal.data.mat import load_mat_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("configs/*.yaml"))


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


# -- recipes are self-contained; Config() is the default recipe ------------------------------

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "openmoji.yaml"
# Owned by the dataset or loss a config names: empty means that builder's or loss's own defaults.
NAMED_PART_OPTIONS = {"data.options", "loss.params"}
# Terms a recipe adds on top of its method; off in Config(), so that a bare config (and a
# method compared by `crossmodal compare`) is the method as its paper states it.
RECIPE_ADD_ONS = {"loss.contrastive", "train.label_texts", "loss.decorrelation", "loss.spread"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_states_every_training_setting(path):
    """A default in config.py can then change without changing any recipe's results."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    missing = [
        f"{section}.{key}"
        for section, settings in training_settings(Config()).items()
        for key in settings
        if key not in (raw.get(section) or {})
    ]
    assert not missing, f"{path.name} leaves these to the defaults: {', '.join(missing)}"


def test_default_config_is_the_default_recipe():
    recipe = training_settings(load_config(DEFAULT_RECIPE))
    differ = set(settings_differences(training_settings(Config()), recipe))
    assert differ == NAMED_PART_OPTIONS | RECIPE_ADD_ONS
    assert Config().loss.contrastive == 0 and not Config().train.label_texts
    assert Config().data.name == recipe["data"]["name"] and Config().loss.name == recipe["loss"]["name"]


def test_default_recipe_data_options_are_the_builders_defaults():
    """So Config()'s empty data.options build the same dataset as the recipe's."""
    builder = inspect.signature(DATASETS.get(Config().data.name)).parameters
    options = load_config(DEFAULT_RECIPE).data.options
    assert options and {k: builder[k].default for k in options} == options


@pytest.mark.parametrize("key", SPLIT_SIZE_KEYS)
def test_split_sizes_only_under_data(key, tmp_path):
    with pytest.raises(ConfigError, match=rf"data\.options\.{key}: set split sizes with data\.{key}"):
        load_config(None, [f"data.options.{key}=5"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  name: openmoji\n  options: {{size: 128, {key}: 5}}\n")
    with pytest.raises(ConfigError, match=rf"data\.options\.{key}"):
        load_config(recipe)
    assert getattr(load_config(None, [f"data.{key}=5"]).data, key) == 5


# the .mat builders pass their options on to load_mat_dataset
BUILDERS = {**{name: DATASETS.get(name) for name in list_datasets()}, "load_mat_dataset": load_mat_dataset}


@pytest.mark.parametrize("builder", BUILDERS.values(), ids=BUILDERS.keys())
def test_builders_take_no_split_sizes(builder):
    assert not set(inspect.signature(builder).parameters) & set(SPLIT_SIZE_KEYS)


def test_recipes_load_by_name_from_any_folder(tmp_path, monkeypatch):
    """The recipes ship with the package: from a user's own folder, --config imagefolder
    (or configs/imagefolder.yaml, as the docs write it) finds the shipped recipe."""
    from crossmodal.config import recipe_names

    here = load_config(ROOT / "configs" / "imagefolder.yaml")
    monkeypatch.chdir(tmp_path)
    assert {"openmoji", "imagefolder", "coco"} <= set(recipe_names())
    for name in ("imagefolder", "imagefolder.yaml", "configs/imagefolder.yaml"):
        assert load_config(name).to_dict() == here.to_dict()
    with pytest.raises(ConfigError, match="shipped recipes, loadable by name: .*imagefolder"):
        load_config("nonesuch")
    own = tmp_path / "imagefolder.yaml"  # a file of the user's own wins over the shipped one
    own.write_text("name: mine\n")
    assert load_config("imagefolder.yaml").name == "mine"


def test_the_packaged_recipes_are_the_configs_folder():
    assert (ROOT / "crossmodal" / "configs").resolve() == (ROOT / "configs").resolve()


def test_built_data_and_feature_caches_live_in_one_place_whatever_the_folder(tmp_path, monkeypatch):
    """A user who runs eval or index --add from another folder finds what was built before,
    and nothing is written next to their files."""
    from crossmodal.data import data_dir
    from crossmodal.io import cache_home, feature_cache_dir

    monkeypatch.delenv("CROSSMODAL_DATA_DIR", raising=False)
    monkeypatch.setenv("CROSSMODAL_HOME", str(tmp_path / "home"))
    for here in (tmp_path / "a", tmp_path / "b"):
        here.mkdir()
        monkeypatch.chdir(here)
        assert data_dir() == tmp_path / "home" / "data"
        assert feature_cache_dir(None) == tmp_path / "home" / "features"
    assert feature_cache_dir("mine") == Path("mine")  # a recipe's own cache_dir wins
    monkeypatch.setenv("CROSSMODAL_DATA_DIR", str(tmp_path / "d"))
    assert data_dir() == tmp_path / "d"
    monkeypatch.delenv("CROSSMODAL_HOME")
    assert cache_home().name.lower() in ("crossmodal", "cache") and cache_home().is_absolute()
    assert Config().train.cache_dir is None
