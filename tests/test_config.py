"""Configs: every preset loads; wrong keys, types and files are errors that name the key."""

from __future__ import annotations

import pytest

from minigpt4.config import (
    EVAL_CONFIG_DIR,
    ModelConfig,
    from_dict,
    load_preset,
    read_yaml,
    resolve_preset,
)
from minigpt4.errors import ConfigError


def _write(tmp_path, text: str):
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def test_every_shipped_preset_parses():
    for path in EVAL_CONFIG_DIR.glob("*.yaml"):
        try:
            cfg = load_preset(path)
        except ConfigError as exc:  # presets that name files the user downloads are allowed to miss them
            assert "not found" in str(exc), f"{path.name}: {exc}"
            continue
        assert cfg.name == path.stem


def test_presets_resolve_by_name_or_path(tiny_cfg_path):
    assert resolve_preset("minigpt4_tiny_random") == tiny_cfg_path
    assert resolve_preset(str(tiny_cfg_path)) == tiny_cfg_path
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        resolve_preset("nope")


def test_unknown_key_is_named(tmp_path, tiny_cfg_path):
    text = tiny_cfg_path.read_text().replace("  template: vicuna0", "  templat: vicuna0")
    with pytest.raises(ConfigError, match=r"preset.yaml: unknown key model.templat"):
        load_preset(_write(tmp_path, text))


def test_wrong_type_is_named(tmp_path, tiny_cfg_path):
    text = tiny_cfg_path.read_text().replace("max_new_tokens: 24", "max_new_tokens: many")
    with pytest.raises(ConfigError, match=r"generation.max_new_tokens must be int, got str 'many'"):
        load_preset(_write(tmp_path, text))


def test_a_float_written_without_a_dot_is_a_float(tiny_cfg_path):
    # PyYAML (YAML 1.1) reads 5e-1 as a string; a float field takes it as the number it is.
    assert load_preset(tiny_cfg_path, ["generation.temperature=5e-1"]).generation.temperature == 0.5
    assert load_preset(tiny_cfg_path, ["generation.top_p=1E0"]).generation.top_p == 1.0
    with pytest.raises(ConfigError, match=r"generation.temperature must be float, got str '5e'"):
        load_preset(tiny_cfg_path, ["generation.temperature=5e"])


def test_missing_checkpoint_names_the_key_and_what_it_is(tmp_path, tiny_cfg_path):
    text = tiny_cfg_path.read_text().replace("checkpoint: null", "checkpoint: /nowhere/proj.pth")
    with pytest.raises(
        ConfigError, match=r"model.projection.checkpoint: the trained projection checkpoint not found"
    ):
        load_preset(_write(tmp_path, text))


def test_missing_tokenizer_dir_is_named(tiny_cfg_path):
    with pytest.raises(ConfigError, match=r"model.llm.tokenizer: directory './no/such/dir' not found"):
        load_preset(tiny_cfg_path, ["model.llm.tokenizer=./no/such/dir"])


def test_overrides_are_typed_and_checked(tiny_cfg_path):
    cfg = load_preset(tiny_cfg_path, ["generation.top_p=0.5", "model.max_context_tokens=512"])
    assert cfg.generation.top_p == 0.5 and cfg.model.max_context_tokens == 512
    with pytest.raises(ConfigError, match="generation.top_p must be in"):
        load_preset(tiny_cfg_path, ["generation.top_p=2"])
    with pytest.raises(ConfigError, match="unknown key generation.topp"):
        load_preset(tiny_cfg_path, ["generation.topp=0.5"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_preset(tiny_cfg_path, ["generation.top_p"])


def test_bad_template_is_named(tiny_cfg_path):
    with pytest.raises(ConfigError, match="model.template must be one of"):
        load_preset(tiny_cfg_path, ["model.template=alpaca"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.llm.random_init.hidden_sise=64", "model.llm.random_init.hidden_sise"),
        ("model.vision.random_init.vision.hidden_sise=32", "model.vision.random_init.vision.hidden_sise"),
        ("model.vision.random_init.qformer.layers=2", "model.vision.random_init.qformer.layers"),
    ],
)
def test_unknown_random_init_keys_are_named(tiny_cfg_path, override, key):
    with pytest.raises(ConfigError, match=rf"unknown key {key}: not an argument of"):
        load_preset(tiny_cfg_path, [override])


@pytest.mark.parametrize(
    "override",
    [
        "model.max_context_tokens=0",
        "max_image_pixels=-1",
        "max_image_bytes=0",
        "max_message_chars=-5",
        "model.vision.image_size=0",
    ],
)
def test_non_positive_limits_are_refused_at_load(tiny_cfg_path, override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match=rf"{key} must be a positive number, got {value}"):
        load_preset(tiny_cfg_path, [override])


def test_object_colour_is_refused_for_a_vision_that_has_no_such_token():
    with pytest.raises(ConfigError, match="object_colour: only kind efficientnet_lite"):
        from_dict(ModelConfig, {"vision": {"kind": "blip2", "object_colour": True}}, "preset")


def test_a_train_config_builds_on_a_base_and_unknown_keys_stay_errors(tmp_path):
    from minigpt4.train.config import load_train_config  # noqa: PLC0415

    root = EVAL_CONFIG_DIR.parent / "train_configs"
    base = read_yaml(root / "minigpt4_stage2_finetune.yaml")
    variant = read_yaml(root / "minigpt4_llama2_stage2_finetune.yaml")
    assert "base" not in variant
    assert variant["model"]["template"] == "llama2" and variant["model"]["vision"]["kind"] == "blip2_patches"
    # The keys the variant does not name are the base's, sections merged key by key.
    assert variant["model"]["vision"]["pretrained"] == base["model"]["vision"]["pretrained"]
    assert variant["data"] == base["data"]
    assert {k: v for k, v in variant["run"].items() if k != "output_dir"} == {
        k: v for k, v in base["run"].items() if k != "output_dir"
    }

    (tmp_path / "base.yaml").write_text((root / "tiny_stage1.yaml").read_text())
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrun:\n  batch_size: 2\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key run\.bogus"):
        load_train_config(tmp_path / "child.yaml")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nrun:\n  batch_size: 2\n")
    merged = read_yaml(tmp_path / "child.yaml", ["run.log_every=3"])
    assert (merged["run"]["batch_size"], merged["run"]["log_every"]) == (2, 3)
    assert merged["data"] == read_yaml(root / "tiny_stage1.yaml")["data"]


def test_a_missing_or_circular_base_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: base 'b\.yaml' is not a file"):
        read_yaml(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base files form a cycle \(a\.yaml → b\.yaml → a\.yaml\)"):
        read_yaml(tmp_path / "a.yaml")
    (tmp_path / "a.yaml").write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="base must be the name of another YAML file"):
        read_yaml(tmp_path / "a.yaml")
