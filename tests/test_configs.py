"""Experiment config loading, arg parsing and command-line overrides."""

import textwrap

import ml_collections
import pytest

from mmjax import configs


def base_config():
    return ml_collections.ConfigDict(dict(
        total_steps=100,
        seed=0,
        log_images=False,
        workdir_name="run",
        init_ckpt=None,
        mesh=[("data", -1)],
        image_size=(224, 224),
        model=dict(variant="B/16", dropout=0.0, embed_dim=512),
        optimizer=dict(name="adamw", b1=0.9, weight_decay=0.2, freeze=(), mu_dtype=None),
        schedule=dict(lr=5e-4, warmup_steps=2000, decay="cosine"),
    ))


# ---------------------------------------------------------------- parse_arg

def test_parse_arg_defaults_and_types():
    arg = configs.parse_arg(None, variant="B/16", smoke=False, steps=100, lr=1e-3, extra=None)
    assert arg.to_dict() == dict(variant="B/16", smoke=False, steps=100, lr=1e-3, extra=None)
    arg = configs.parse_arg("variant=L/14, smoke=True,steps=10,lr=3e-4,extra=[1, 2]",
                            variant="B/16", smoke=False, steps=100, lr=1e-3, extra=None)
    assert arg.variant == "L/14" and arg.smoke is True and arg.steps == 10
    assert isinstance(arg.lr, float) and arg.lr == pytest.approx(3e-4)
    assert arg.extra == [1, 2]
    assert configs.parse_arg("extra=foo", extra=None).extra == "foo"
    assert configs.parse_arg("lr=1", lr=0.5).lr == 1.0


@pytest.mark.parametrize("text,expected", [
    ("True", True), ("true", True), ("1", True), ("False", False), ("false", False), ("0", False)])
def test_parse_arg_bool(text, expected):
    assert configs.parse_arg(f"smoke={text}", smoke=not expected).smoke is expected


def test_parse_arg_bare_bool_flag():
    assert configs.parse_arg("smoke", smoke=False).smoke is True


def test_parse_arg_unknown_key_lists_allowed():
    with pytest.raises(ValueError, match="varaint") as err:
        configs.parse_arg("varaint=B/32", variant="B/16", smoke=False)
    assert "variant" in str(err.value) and "smoke" in str(err.value)


@pytest.mark.parametrize("arg", ["steps=ten", "smoke=yes", "lr=fast"])
def test_parse_arg_bad_value(arg):
    with pytest.raises(ValueError):
        configs.parse_arg(arg, steps=1, smoke=False, lr=0.1)


def test_parse_arg_result_is_locked():
    arg = configs.parse_arg("", variant="B/16")
    with pytest.raises(AttributeError):
        arg.varient = "x"


# ---------------------------------------------------------------- load_config

EXPERIMENT = """
    import ml_collections
    from mmjax.configs import parse_arg

    def get_config(arg=None):
        arg = parse_arg(arg, variant="B/16", smoke=False, steps=1000)
        config = ml_collections.ConfigDict()
        config.total_steps = 10 if arg.smoke else arg.steps
        config.model = dict(variant=arg.variant)
        return config
"""


def write(tmp_path, text, name="exp.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_load_config_plain_and_with_arg(tmp_path):
    path = write(tmp_path, EXPERIMENT)
    config = configs.load_config(path)
    assert config.total_steps == 1000 and config.model.variant == "B/16"
    config = configs.load_config(f"{path}:variant=L/14,smoke=True")
    assert config.total_steps == 10 and config.model.variant == "L/14"
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.totl_steps = 5


def test_load_config_arg_errors_propagate(tmp_path):
    path = write(tmp_path, EXPERIMENT)
    with pytest.raises(ValueError, match="smok"):
        configs.load_config(f"{path}:smok=True")


def test_load_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        configs.load_config(str(tmp_path / "nope.py") + ":smoke=True")


def test_load_config_without_get_config(tmp_path):
    path = write(tmp_path, "x = 1\n", name="bad.py")
    with pytest.raises(ValueError, match="get_config"):
        configs.load_config(path)


def test_load_config_bad_spec():
    with pytest.raises(ValueError, match="file.py"):
        configs.load_config("experiments/clip")


# ---------------------------------------------------------------- overrides

@pytest.mark.parametrize("prefix", ["--config.", "config.", ""])
def test_override_nested_key_all_prefixes(prefix):
    config = configs.apply_overrides(base_config(), [f"{prefix}model.variant=L/14"])
    assert config.model.variant == "L/14"


def test_override_returns_locked_copy():
    original = base_config()
    config = configs.apply_overrides(original, ["--config.total_steps=5"])
    assert config.total_steps == 5 and original.total_steps == 100
    assert config.is_locked


def test_override_lists_tuples_and_none():
    config = configs.apply_overrides(base_config(), [
        '--config.mesh=[("data",-1),("fsdp",2)]',
        "--config.image_size=[256, 256]",
        "--config.optimizer.freeze=['^image/', 'text/.*bias']",
        "--config.optimizer.mu_dtype=bfloat16",
        "--config.init_ckpt=/ckpt/x",
        "--config.optimizer.b1=None",
    ])
    assert config.mesh == [("data", -1), ("fsdp", 2)]
    assert config.image_size == (256, 256)
    assert tuple(config.optimizer.freeze) == ("^image/", "text/.*bias")
    assert config.optimizer.mu_dtype == "bfloat16"
    assert config.init_ckpt == "/ckpt/x"
    assert config.optimizer.b1 is None


def test_override_type_conversion():
    config = configs.apply_overrides(base_config(), [
        "--config.schedule.lr=1",  # int -> float field.
        "--config.model.dropout=0",
        "--config.log_images=true",
        "--config.seed=1e3",  # Integral float -> int field.
        "--config.workdir_name=123",  # str field keeps the text.
        "--config.model.variant=So400m/14",
    ])
    assert isinstance(config.schedule.lr, float) and config.schedule.lr == 1.0
    assert isinstance(config.model.dropout, float)
    assert config.log_images is True
    assert config.seed == 1000 and isinstance(config.seed, int)
    assert config.workdir_name == "123"
    assert config.model.variant == "So400m/14"
    config = configs.apply_overrides(config, ["config.log_images=False"])
    assert config.log_images is False


def test_override_unknown_key_suggests():
    with pytest.raises(KeyError) as err:
        configs.apply_overrides(base_config(), ["--config.schedule.warmup_step=10"])
    message = str(err.value)
    assert "schedule.warmup_step" in message and "schedule.warmup_steps" in message
    with pytest.raises(ValueError, match="model.varaint.*model.variant"):
        configs.apply_overrides(base_config(), ["--config.model.varaint=B/32"])


def test_override_unknown_key_suggests_other_group():
    with pytest.raises(KeyError, match="schedule.lr"):
        configs.apply_overrides(base_config(), ["--config.optimizer.lr=1e-3"])


def test_override_through_a_leaf_errors():
    with pytest.raises(KeyError, match="seed.x"):
        configs.apply_overrides(base_config(), ["--config.seed.x=1"])


@pytest.mark.parametrize("override,match", [
    ("--config.total_steps=abc", "total_steps"),
    ("--config.total_steps=1.5", "int"),
    ("--config.log_images=maybe", "log_images"),
    ("--config.schedule.lr=fast", "float"),
    ("--config.mesh=7", "list"),
    ("--config.model=1", "group"),
    ("--config.seed=True", "int"),
])
def test_override_bad_type(override, match):
    with pytest.raises(ValueError, match=match):
        configs.apply_overrides(base_config(), [override])


def test_override_malformed():
    with pytest.raises(ValueError, match="--config"):
        configs.apply_overrides(base_config(), ["--config.seed"])


def test_override_frozen_config():
    frozen = ml_collections.FrozenConfigDict(base_config())
    config = configs.apply_overrides(frozen, ["--config.model.embed_dim=768"])
    assert isinstance(config, ml_collections.ConfigDict) and config.model.embed_dim == 768


# ---------------------------------------------------------------- validate

def test_validate():
    configs.validate(base_config(), ["total_steps", "model", "model.variant"])
    with pytest.raises(ValueError, match="input, evals") as err:
        configs.validate(base_config(), ["total_steps", "input", "evals"])
    assert isinstance(err.value, KeyError)
