"""Config files: every shipped YAML validates; bad keys and values fail with the key named."""

import pytest
from conftest import CONFIGS

from magseg.config import config_from_dict, load_config, parse_overrides
from magseg.errors import ConfigError


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_round_trip(path):
    config = load_config(path)
    again = config_from_dict(config.to_dict())
    assert again == config


def test_deepglobe_config_is_magnets_pyramid():
    config = load_config(CONFIGS / "deepglobe.yaml")
    assert config.pyramid.scales == ((612, 612), (1224, 1224), (2448, 2448))
    assert config.pyramid.crop == (612, 612)
    assert [c.name for c in config.classes][:2] == ["unknown", "urban"]
    assert not config.classes[0].in_mean and all(c.in_mean for c in config.classes[1:])
    assert config.classes[5].color == (0, 0, 255)


def test_pyramid256_config_has_four_stages():
    config = load_config(CONFIGS / "pyramid256.yaml")
    assert [s[0] for s in config.pyramid.scales] == [256, 512, 1024, 2048]


def test_overrides_are_parsed_as_yaml_and_applied():
    config = load_config(CONFIGS / "tiny.yaml",
                         ["refine.points=7", "pyramid.scales=[16, 32]", "model.encoder_weights=none"])
    assert config.refine.points == 7 and isinstance(config.refine.points, int)
    assert config.pyramid.scales == ((16, 16), (32, 32))
    assert config.model.encoder_weights is None
    assert parse_overrides(["a.b=0.5", "c=[1, 2]"]) == {"a.b": 0.5, "c": [1, 2]}


def test_config_override_returns_a_new_validated_config(tiny_config):
    changed = tiny_config.override({"refine.points": 0.25})
    assert changed.refine.points == 0.25 and tiny_config.refine.points == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.encoderr=resnet18", "model.encoderr: unknown key"),
        ("pyramid.scales=[64, 32]", "must grow coarse to fine"),
        ("refine.kernel=4", "odd"),
        ("refine.points=1.5", "fraction"),
        ("refine.points=-1", "refine.points"),
        ("engine.precision=fp8", "engine.precision"),
        ("data.bands=[1, 2]", "data.bands has 2 bands"),
        # What a flag refuses, --set refuses too: every route goes through the schema.
        ("data.std=[0, 0, 0]", "data.std must be > 0"),
        ("data.std=[64, -1, 64]", "data.std must be > 0"),
        ("data.mean=[1, 2]", "data.mean has 2 values"),
        ("engine.adaptive.max_crops=-3", "engine.adaptive.max_crops must be >= 0"),
        ("engine.adaptive.threshold=nan", "engine.adaptive.threshold: Input should be a finite number"),
        ("engine.adaptive.threshold=1.5", "engine.adaptive.threshold is a mean uncertainty"),
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("refine.points=.nan", "refine.points"),
        ("train.batch_size=99999999999999999999", "train.batch_size=99999999999999999999 is larger"),
        ("engine.batch_size=99999999999999999999", "engine.batch_size=99999999999999999999 is larger"),
        ("engine.device=gpu", "engine.device=gpu: not a device; use cpu, cuda, cuda:N"),
        ("engine.device=tpu", "engine.device=tpu: not a device"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert "tiny.yaml" in str(err.value)


def test_bad_override_syntax_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["refine.points"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pyramid: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_class_ids_must_be_contiguous(tiny_config):
    data = tiny_config.to_dict()
    data["classes"][1]["id"] = 5
    with pytest.raises(ConfigError, match="ids 0..n-1"):
        config_from_dict(data)


def test_device_names_are_checked_by_form_not_by_this_machine():
    # A checkpoint trained on a GPU must still load here, to run with --device cpu.
    for name, stored in (("cuda:7", "cuda:7"), ("CUDA", "cuda"), (" mps ", "mps"), ("cpu", "cpu")):
        assert load_config(CONFIGS / "tiny.yaml", [f"engine.device='{name}'"]).engine.device == stored


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_config(bad)


def test_a_config_that_is_not_a_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="a mapping of sections is needed, got str"):
        config_from_dict("abc", source="in checkpoint x.ckpt")
