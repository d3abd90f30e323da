"""Configs (reftune.config): YAML + key=value overrides into dataclasses, loud on every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import small_data

from reftune.config import ConfigError, apply_override, from_dict, load_config, save_config, to_dict
from reftune.demo import DemoConfig
from reftune.inference.evaluate import EvalConfig
from reftune.trainers.reft import ReFTConfig
from reftune.trainers.sft import SFTConfig
from reftune.tasks import DataConfig
from reftune.tiny import BuildTinyConfig

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- files

def test_yaml_and_overrides_fill_the_dataclass(tmp_path):
    path = write(tmp_path, "model: some/model\nepochs: 5\nlr: 3.0e-3\ndata:\n  style: nl\n  n_train: 100\n")
    cfg = load_config(SFTConfig, path, ["epochs=7", "data.max_steps=3"])
    assert isinstance(cfg, SFTConfig)
    assert (cfg.model, cfg.epochs, cfg.lr) == ("some/model", 7, 3e-3)
    assert (cfg.data.style, cfg.data.n_train, cfg.data.max_steps) == ("nl", 100, 3)
    assert cfg.data.min_steps == 2 and cfg.batch_size == 32  # untouched defaults stay


def test_no_file_no_overrides_gives_defaults():
    assert load_config(SFTConfig) == SFTConfig()
    assert load_config(ReFTConfig, None, []) == ReFTConfig()


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(SFTConfig, write(tmp_path, "# nothing but a comment\n")) == SFTConfig()


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    path = write(tmp_path, "model: x\nepochz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    assert "'epochz'" in str(err.value) and str(path) in str(err.value)
    assert "epochs" in str(err.value)  # the known keys are listed, so the typo is easy to spot


def test_unknown_nested_key_in_yaml_names_key_and_file(tmp_path):
    path = write(tmp_path, "data:\n  styel: nl\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    assert "'styel'" in str(err.value) and str(path) in str(err.value) and "'data'" in str(err.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(SFTConfig, None, ["bogus=1"])
    with pytest.raises(ConfigError, match="'data.bogus'"):
        load_config(SFTConfig, None, ["data.bogus=1"])
    with pytest.raises(ConfigError, match="'epochs' has no sub-keys"):
        load_config(SFTConfig, None, ["epochs.x=1"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(SFTConfig, None, ["epochs"])


@pytest.mark.parametrize("source", ["yaml", "override"])
def test_wrong_type_names_key_value_and_type(source, tmp_path):
    if source == "yaml":
        path, overrides = write(tmp_path, 'epochs: "three"\n'), []
    else:
        path, overrides = None, ["epochs=three"]
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path, overrides)
    message = str(err.value)
    assert "'epochs'" in message and "'three'" in message and "int" in message
    if path:
        assert str(path) in message


@pytest.mark.parametrize("text, error", [
    ("epochs: 1.5\n", "expected int"),  # no silent truncation
    ("epochs: true\n", "expected int"),  # bool is not an int here
    ("tensorboard: 1\n", "expected bool"),
    ("save_epochs: 2\n", "expected a list"),
    ("save_epochs: [1, two]\n", "save_epochs"),
    ("data: nl\n", "expected a mapping"),
    ("kl_coef: high\n", "kl_coef"),
])
def test_more_wrong_types(text, error, tmp_path):
    cls = ReFTConfig if "kl_coef" in text else SFTConfig
    with pytest.raises(ConfigError, match=error):
        load_config(cls, write(tmp_path, text))


def test_ints_are_accepted_for_floats_and_null_for_optional(tmp_path):
    cfg = load_config(ReFTConfig, write(tmp_path, "lr: 1\nkl_coef: null\n"))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.kl_coef is None
    assert load_config(ReFTConfig, None, ["kl_coef=0.02"]).kl_coef == 0.02
    assert load_config(ReFTConfig, None, ["kl_coef=null"]).kl_coef is None


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model: x\nepochs: 3\ndata:\n  style: [nl\n  n_train: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, path)
    message = str(err.value)
    assert str(path) in message and "malformed YAML" in message
    assert "line 5, column 10" in message  # where the parser gave up: the unclosed [ meets a ':'


def test_malformed_yaml_reports_the_right_line(tmp_path):
    path = write(tmp_path, "model: x\nepochs: 3\nlr: : 2\n")
    with pytest.raises(ConfigError, match=r"line 3\b"):
        load_config(SFTConfig, path)


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(SFTConfig, write(tmp_path, "- a\n- b\n"))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found: /nonexistent/cfg.yaml"):
        load_config(SFTConfig, "/nonexistent/cfg.yaml")


# ------------------------------------------------------------------------------- overrides

def test_nested_override():
    cfg = load_config(SFTConfig, None, ["data.style=nl", "data.n_train=12"])
    assert cfg.data.style == "nl" and cfg.data.n_train == 12
    demo = load_config(DemoConfig, None, ["sft.data.max_steps=3", "tiny.hidden_size=64", "reft.steps=5"])
    assert (demo.sft.data.max_steps, demo.tiny.hidden_size, demo.reft.steps) == (3, 64, 5)
    assert demo.reft.questions_per_step == 32  # the section's own defaults are kept


def test_nested_override_merges_with_the_file(tmp_path):
    path = write(tmp_path, "data:\n  name: arithmetic\n  n_train: 50\n")
    cfg = load_config(SFTConfig, path, ["data.style=nl"])
    assert (cfg.data.name, cfg.data.n_train, cfg.data.style) == ("arithmetic", 50, "nl")


@pytest.mark.parametrize("raw, expected", [
    ("1e-5", 1e-5), ("3e-3", 3e-3), ("1E-5", 1e-5), ("1.0e-5", 1e-5), ("2", 2.0), ("0.5", 0.5), (".5", 0.5),
])
def test_float_overrides(raw, expected):
    cfg = load_config(SFTConfig, None, [f"lr={raw}"])
    assert isinstance(cfg.lr, float) and cfg.lr == expected


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(SFTConfig, None, ["save_epochs=[1, 3]", "tensorboard=false", "epochs=4",
                                        "model=Qwen/Qwen2.5-0.5B", "out_dir=runs/a.b", "data.data_dir="])
    assert cfg.save_epochs == [1, 3] and cfg.tensorboard is False and cfg.epochs == 4
    assert cfg.model == "Qwen/Qwen2.5-0.5B" and cfg.out_dir == "runs/a.b" and cfg.data.data_dir == ""


def test_override_wins_over_file_and_later_override_wins(tmp_path):
    path = write(tmp_path, "epochs: 2\n")
    assert load_config(SFTConfig, path, ["epochs=3", "epochs=5"]).epochs == 5


def test_apply_override_leaves_other_keys_alone():
    values = {"data": {"name": "svamp"}, "epochs": 2}
    apply_override(values, "data.style=nl", SFTConfig)
    assert values == {"data": {"name": "svamp", "style": "nl"}, "epochs": 2}


# ------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("cls", [SFTConfig, ReFTConfig, EvalConfig, BuildTinyConfig, DemoConfig])
def test_saved_config_loads_back_identically(cls, tmp_path):
    cfg = cls()
    if hasattr(cfg, "data"):
        cfg.data = small_data(style="nl")
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(cls, tmp_path / "config.yaml") == cfg
    assert from_dict(cls, to_dict(cfg)) == cfg


def test_run_folder_gets_the_resolved_config(tmp_path, tiny_model, small_task):
    """The run folder's config.yaml holds every key with its final value (defaults included)."""
    from reftune.trainers.sft import run_sft

    cfg = load_config(SFTConfig, write(tmp_path, "epochs: 1\nbatch_size: 32\n"),
                      [f"model={tiny_model}", f"out_dir={tmp_path / 'run'}", "lr=1e-3", "eval_split=none",
                       "progress=false", "tensorboard=false", "data.n_train=64", "data.n_test=16",
                       "data.validation_size=8", "data.max_steps=3", "device=cpu"])
    run_sft(cfg, task=small_task)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert set(saved) == set(to_dict(SFTConfig()))
    assert saved["lr"] == 1e-3 and saved["epochs"] == 1 and saved["data"]["n_train"] == 64
    assert saved["data"]["style"] == "program" and saved["warmup_ratio"] == 0.1  # defaults written too
    assert load_config(SFTConfig, tmp_path / "run" / "config.yaml") == cfg


@pytest.mark.parametrize("path, cls", [
    ("configs/svamp_tiny/build.yaml", BuildTinyConfig),
    ("configs/svamp_tiny/sft.yaml", SFTConfig),
    ("configs/svamp_tiny/reft.yaml", ReFTConfig),
    ("configs/paper/svamp_pcot_sft.yaml", SFTConfig),
    ("configs/paper/svamp_pcot_reft.yaml", ReFTConfig),
])
def test_shipped_configs_load(path, cls):
    cfg = load_config(cls, REPO / path)
    assert cfg.data.name == "svamp"


def test_nested_override_on_an_empty_yaml_section(tmp_path):
    # `data:` with nothing under it is None in YAML: it means "all defaults", and overrides reach into it.
    path = write(tmp_path, "data:\nepochs: 2\n")
    assert load_config(SFTConfig, path, ["data.style=nl"]).data.style == "nl"
    assert load_config(SFTConfig, path).data == DataConfig()


def test_a_partial_section_completes_the_default_of_its_field():
    """`reftune demo sft.lr=...` keeps the demo's SFT settings (18 epochs), not SFTConfig's bare
    defaults (3), and an empty YAML section means the field's own default."""
    from reftune.demo import DemoConfig

    cfg = load_config(DemoConfig, None, ["sft.lr=1e-4", "data.n_train=100"])
    default = DemoConfig()
    assert (cfg.sft.epochs, cfg.sft.lr) == (default.sft.epochs, 1e-4)
    assert (cfg.data.n_train, cfg.data.n_test) == (100, default.data.n_test)
    assert from_dict(DemoConfig, {"reft": None}).reft == default.reft


def test_a_renamed_key_works_for_one_release_with_a_note(capsys):
    from reftune.inference.sample import SampleConfig
    from reftune.trainers.sft import SFTConfig

    # `eval_batch_size` (SFT) and `batch_size` (sample) are the old names of `gen_batch_size`.
    assert load_config(SFTConfig, None, ["eval_batch_size=3"]).gen_batch_size == 3
    assert load_config(SFTConfig, None, ["eval_batch_size=3"]).batch_size == 32  # SFT's own training batch stays
    assert from_dict(SampleConfig, {"batch_size": 7}).gen_batch_size == 7
    assert "now called 'gen_batch_size'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="both given"):
        from_dict(SampleConfig, {"batch_size": 7, "gen_batch_size": 3})


def test_each_shared_field_is_declared_once():
    """A field of a shared section (runtime, sampling, LoRA, ...) is documented in its section only:
    a config composed of sections may re-declare a section field's default, never document it again."""
    import ast
    import dataclasses
    import importlib
    import inspect
    import pkgutil
    import textwrap

    import reftune
    import reftune.options as options

    for mod in pkgutil.walk_packages(reftune.__path__, "reftune."):
        importlib.import_module(mod.name)

    def subclasses(cls):
        return {cls} | {s for sub in cls.__subclasses__() for s in subclasses(sub)}

    twice = {}
    for cls in subclasses(options.Section):
        inherited = {f.name for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)
                     and base.__module__ == options.__name__ for f in dataclasses.fields(base)}
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id in inherited
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)):
                twice.setdefault(stmt.target.id, []).append(cls.__name__)
    assert not twice, twice
    composed = {cls.__name__ for cls in subclasses(options.Section)}
    assert {"SFTConfig", "ReFTConfig", "EvalConfig", "CompareConfig", "RewardModelConfig"} <= composed
