import pytest

from tunelab.config import DemoConfig, PretrainConfig, apply_override, load_config
from tunelab.errors import ConfigError

BASE = ["model.preset=micro", "model.tokenizer=tok", "data.sources=[{path: a.txt}]"]


def test_overrides_parse_types_and_nesting():
    cfg = load_config(PretrainConfig, None, BASE + ["train.lr=3e-4", "train.steps=7", "train.betas=[0.8, 0.9]",
                                                    "data.sources.0.weight=2.5", "name=2024"])
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7 and cfg.train.betas == (0.8, 0.9)
    assert cfg.data.sources[0].weight == 2.5 and cfg.name == "2024"  # a number is a fine run name


def test_override_replaces_value_from_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: micro, tokenizer: t}\ndata:\n  sources:\n    - path: x.txt\n"
                      "train:\n  lr: 0.1\n")
    assert load_config(PretrainConfig, recipe, ["train.lr=0.2"]).train.lr == 0.2
    assert load_config(PretrainConfig, recipe).train.lr == 0.1


def test_unknown_key_names_key_and_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.lerning_rate' \(did you mean 'train.lr'\?\)"):
        load_config(PretrainConfig, None, BASE + ["train.lerning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.colour'.*valid keys") as e:
        load_config(PretrainConfig, None, BASE + ["train.colour=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.setps' \(did you mean 'train.steps'\?\)"):
        load_config(PretrainConfig, None, BASE + ["train.setps=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'data.sources.0.wieght' \(did you mean "
                                          r"'data.sources.0.weight'\?\)"):
        load_config(PretrainConfig, None, BASE + ["data.sources.0.wieght=1"])
    assert "lr" in str(e.value)  # the list of valid keys is shown when nothing is close


def test_invalid_values_and_missing_sections():
    with pytest.raises(ConfigError, match=r"train.precision"):
        load_config(PretrainConfig, None, BASE + ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"missing required key 'data'"):
        load_config(PretrainConfig, None, ["model.preset=micro", "model.tokenizer=t"])
    with pytest.raises(ConfigError, match=r"exactly one of model.base"):
        load_config(PretrainConfig, None, BASE + ["model.base=somewhere"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: micro\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{bad.name}:\d+: malformed YAML"):
        load_config(PretrainConfig, bad)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(PretrainConfig, tmp_path / "list.yaml")


@pytest.mark.parametrize("override, message", [
    ("name=a/../../b", "must be one directory name"), ("name=", "must be one directory name"),
    ("train.betas=[1.5, 0.9]", "train.betas.0"), ("seed=-1", "seed"), ("train.lr=.inf", "train.lr"),
    ("data.sources.0.weight=.nan", "data.sources.0.weight")])
def test_out_of_range_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, BASE + [override])


def test_bad_override_syntax():
    raw = {"data": {"sources": [{"path": "a"}]}}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(raw, "train.lr")
    with pytest.raises(ConfigError, match="is a list of 1"):
        apply_override(raw, "data.sources.3.weight=1")


def test_shipped_demo_recipe_equals_builtin_defaults():
    from pathlib import Path

    shipped = load_config(DemoConfig, Path(__file__).parents[1] / "examples" / "demo.yaml")
    assert shipped == DemoConfig()


def test_shipped_pretraining_recipe_validates():
    from pathlib import Path

    cfg = load_config(PretrainConfig, Path(__file__).parents[1] / "examples" / "pretrain_text.yaml")
    assert cfg.model.preset == "tiny" and len(cfg.data.sources) == 2


def test_duplicate_yaml_keys_are_errors_naming_file_line_and_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: micro, tokenizer: t}\ndata:\n  sources:\n    - path: x.txt\n"
                      "train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"r\.yaml:8: duplicate key 'lr' \(first set at line 6\)"):
        load_config(PretrainConfig, recipe)
    recipe.write_text("model: {preset: micro, preset: tiny, tokenizer: t}\n")  # in a flow mapping, on one line
    with pytest.raises(ConfigError, match=r"r\.yaml:1: duplicate key 'preset'"):
        load_config(PretrainConfig, recipe)


def test_an_invalid_override_is_blamed_on_the_override_not_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: micro, tokenizer: t}\ndata:\n  sources:\n    - path: x.txt\n")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, recipe, ["train.lr=abc"])
    assert str(e.value).startswith("override 'train.lr=abc': train.lr: ") and "r.yaml" not in str(e.value)
    recipe.write_text("model: {preset: micro, tokenizer: t}\ndata:\n  sources:\n    - path: x.txt\n"
                      "train: {steps: 0}\n")  # the recipe's own mistake stays the recipe's, next to the override's
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, recipe, ["train.lerning_rate=1"])
    assert str(e.value).count("r.yaml: train.steps") == 1
    assert "override 'train.lerning_rate=1': unknown key 'train.lerning_rate'" in str(e.value)
