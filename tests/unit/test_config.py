"""Config: strict schema, overrides, error messages naming the key path and the expected type."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from fssmeta.config import SGD_RECIPE, Config, ConfigError, OptimConfig, config_to_dict
from fssmeta.models import METHODS, get_method
from fssmeta.models.bam import BAMOptions
from fssmeta.models.pfenet import PFENetOptions
from fssmeta.params import config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_load_and_round_trip():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.data.dataset == "synthetic"
    assert set(cfg.data.targets) == {"gray", "hazy", "tiles"}
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_defaults_without_file_and_frozen():
    cfg = load_config(None)
    assert cfg.model_dump(exclude={"model"}) == Config().model_dump(exclude={"model"})
    # the loader fills every method's options section with its defaults, so a dumped config says what ran
    assert cfg.model.options("bam") == config_to_dict(BAMOptions()) and Config().model.options("bam") == {}
    with pytest.raises(ValidationError, match="frozen"):
        cfg.data.root = "elsewhere"


def test_dotted_overrides_parse_like_yaml():
    cfg = load_config(None, ["episodes.shots=[1, 2]", "transform.scale_min=1e-1", "data.exclude_novel_images=false"])
    assert cfg.episodes.shots == (1, 2)
    assert cfg.transform.scale_min == pytest.approx(0.1)
    assert cfg.data.exclude_novel_images is False
    assert load_config(None, {"data.root": "/x"}).data.root == "/x"


@pytest.mark.parametrize(("override", "expected"), [
    ("data.min_object_pixels=abc", "data.min_object_pixels: expected int, got str 'abc'"),
    ("data.bogus=1", "data.bogus: unknown key"),
    ("episodes.shots=[1, x]", "episodes.shots.1: expected int"),
    ("transform.crop_size=1.5", "transform.crop_size: expected int"),
    ("data.exclude_novel_images=1", "data.exclude_novel_images: expected bool"),
    ("data.coco_split=random", "data.coco_split: Input should be 'interleaved' or 'consecutive'"),
    ("data.targets={t: {layout: deepglobe}}", "data.targets.t.root: Field required"),
    ("model.bam.reduce_dim=abc", "model.bam.reduce_dim: expected int, got str 'abc'"),
    ("model.pfenet.bogus=1", "model.pfenet.bogus: unknown key"),
    ("model.reduce_dim=16", "model.reduce_dim: unknown key (method option sections: "
                            + ", ".join(sorted(k for k, m in METHODS.items() if m.options is not None)) + ")"),
    # removed: no model honoured it; a key nothing reads is rejected, never silently ignored
    ("model.support_masking=hybrid", "model.support_masking: unknown key"),
    ("model.shot=5", "model.shot: unknown key"),
    # counts: rejected at load with their key path, not found mid-run
    ("episodes.test_episodes=0", "episodes.test_episodes: Input should be greater than 0"),
    ("episodes.target_episodes=-3", "episodes.target_episodes: Input should be greater than 0"),
    ("episodes.shots=[1, -5]", "episodes.shots.1: Input should be greater than 0"),
    ("episodes.test_seeds=[]", "episodes.test_seeds: Tuple should have at least 1 item"),
    ("eval.episodes=-1", "eval.episodes: Input should be greater than or equal to 0"),
    ("eval.shots=[0]", "eval.shots.0: Input should be greater than 0"),
    ("train.batch_size=0", "train.batch_size: Input should be greater than 0"),
    ("train.val_episodes=-1", "train.val_episodes: Input should be greater than or equal to 0"),
])
def test_bad_values_name_the_key_path_and_type(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_malformed_params_files_name_the_file(tmp_path):
    bad_yaml = tmp_path / "p1.yaml"
    bad_yaml.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="p1.yaml: not valid YAML"):
        load_config(bad_yaml)
    not_mapping = tmp_path / "p2.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="p2.yaml: the top level must be a mapping"):
        load_config(not_mapping)
    unknown = tmp_path / "p3.yaml"
    unknown.write_text("data:\n  root: x\nmodle: {}\n")
    with pytest.raises(ConfigError, match=r"p3.yaml: invalid configuration\n  modle: unknown key"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="missing.yaml: params file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(None, ["data.root"])


def test_method_options_are_typed_by_the_record():
    cfg = load_config(None, ["model.method=pfenet", "model.pfenet.pyramid_bins=[9, 5, 3, 2]"])
    options = get_method("pfenet").options_of(cfg.model)
    assert isinstance(options, PFENetOptions) and options.pyramid_bins == (9, 5, 3, 2) and options.reduce_dim == 256
    # a dumped and reloaded config (a checkpoint, a Ray worker) keeps them
    assert get_method("pfenet").options_of(config_from_dict(config_to_dict(cfg)).model) == options


def test_train_optim_unset_keys_take_the_method_recipe():
    cfg = load_config(None, ["train.optim.lr=0.5"])
    resolved = get_method("bam").training_recipe(cfg.train.optim)
    assert resolved == SGD_RECIPE.model_copy(update={"lr": 0.5})
    with pytest.raises(ValueError, match="incomplete: optimizer"):
        OptimConfig(lr=1.0).resolved(OptimConfig(momentum=0.9, weight_decay=0.0, power=0.0, warmup_steps=0, lr=2.0))


def test_the_shipped_params_give_each_method_its_rate():
    """params.yaml's CPU rate reaches the SGD methods only (`train.method_optim`): switching model.method to an
    Adam / AdamW method trains at that method's recipe, never at an SGD rate (the former lr 0.05 trap)."""

    cfg = load_config(ROOT / "params.yaml")
    rates = {key: (m.training_recipe(cfg.train.optim, cfg.train.method_optim).optimizer,
                   m.training_recipe(cfg.train.optim, cfg.train.method_optim).lr) for key, m in METHODS.items() if m.learned}
    assert rates == {"pfenet": ("sgd", 0.05), "bam": ("sgd", 0.05), "ntrenet": ("sgd", 0.05), "crnet": ("sgd", 0.05),
                     "hdmnet": ("adamw", 1.0e-3), "sccan": ("sgd", 0.05), "hsnet": ("adam", 1.0e-3),
                     "asnet": ("adam", 1.0e-3)}
    # a run's train.optim still overrides every method; a per-method entry only its own
    swept = load_config(ROOT / "params.yaml", ["train.optim.lr=0.01"])
    assert get_method("hsnet").training_recipe(swept.train.optim, swept.train.method_optim).lr == 0.01
    with pytest.raises(ConfigError, match=r"train\.method_optim\.bamm: not a method \(model\.method keys: asnet, bam"):
        load_config(None, ['train.method_optim={"bamm": {"lr": 0.1}}'])


def test_eval_size_is_the_one_test_size_rule():
    assert load_config(None, ["eval.test_size=473", "eval.resized_size=400"]).eval.size == 473
    assert load_config(None, ["eval.resolution=resized", "eval.test_size=473", "eval.resized_size=400"]).eval.size == 400
