"""The config system: layered precedence, validation errors, the shipped configs, dump/flatten.

Every test works on real YAML files in a temporary directory; nothing is mocked.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from pipeline.cli import run_command
from pipeline.config import Config, dump_config, flatten_config, load_config
from pipeline.config.loader import (
    COMMAND_LINE,
    Layer,
    dotted_to_nested,
    model_config_path,
    read_yaml_mapping,
    resolve,
)
from pipeline.errors import USER_ERROR_EXIT_CODE, ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "configs" / "model_configs"
TRAINING_DIR = REPO / "configs" / "training_configs"
GPT3_SIZES = ["125M", "350M", "760M", "1.3B", "2.7B", "6.7B", "13B", "175B"]
MODEL_FILES = sorted(MODEL_DIR.glob("*.yaml"))
TRAINING_FILES = sorted(TRAINING_DIR.glob("*.yaml"))

# A training config that is valid on its own (the schema needs an end and a batch size).
MINIMAL_TRAINING = {"training": {"max_steps": 10, "global_batch_size": 4}}


def write(path: Path, content: str | dict[str, Any]) -> Path:
    """Write YAML (a dict is dumped, a string is dedented) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(content, sort_keys=False) if isinstance(content, dict) else content
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(**kwargs: Any) -> str:
    """Run load_config, expect a ConfigError, and return its (one-line) message."""
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A scratch checkout: a copy of configs/ and params.yaml, and the working directory."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


# --------------------------------------------------------------------------------------------
# Precedence
# --------------------------------------------------------------------------------------------

# The value each layer gives `training.lr` and `model.dropout`, lowest layer first.
LAYER_VALUES = {
    "defaults": (6e-4, 0.0),
    "model": (1e-4, 0.1),
    "training": (2e-4, 0.2),
    "params": (3e-4, 0.3),
    "cli": (4e-4, 0.4),
}
LAYER_ORDER = list(LAYER_VALUES)


def write_layers(root: Path, top: str) -> dict[str, Any]:
    """Files where every layer up to and including `top` sets training.lr and model.dropout."""
    upto = LAYER_ORDER[: LAYER_ORDER.index(top) + 1]

    def keys(layer: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if layer not in upto:
            return {}, {}
        lr, dropout = LAYER_VALUES[layer]
        return {"lr": lr}, {"dropout": dropout}

    lr, drop = keys("model")
    model = write(root / "model.yaml", {"model": {"n_layer": 2, **drop}, "training": lr})
    lr, drop = keys("training")
    training = write(
        root / "training.yaml",
        {"model": drop, "training": {"max_steps": 5, "global_batch_size": 2, **lr}},
    )
    lr, drop = keys("params")
    params = write(
        root / "params.yaml",
        {
            "model": {"config": str(model), **drop},
            "training": {"config": str(training), **lr},
        },
    )
    lr, drop = keys("cli")
    overrides = {"training.lr": lr.get("lr"), "model.dropout": drop.get("dropout")}
    return {"params_file": params, "overrides": overrides}


@pytest.mark.parametrize("top", LAYER_ORDER)
def test_each_layer_beats_the_one_below(tmp_path: Path, top: str) -> None:
    config = load_config(**write_layers(tmp_path, top))
    lr, dropout = LAYER_VALUES[top]
    assert config.training.lr == pytest.approx(lr)
    assert config.model.dropout == pytest.approx(dropout)
    assert config.model.n_layer == 2  # the model file still counts where nothing overrides it
    assert config.training.max_steps == 5


@pytest.mark.parametrize("top", ["model", "training", "params", "cli"])
def test_a_bad_value_is_blamed_on_the_layer_that_set_it(tmp_path: Path, top: str) -> None:
    kwargs = write_layers(tmp_path, "cli")
    source = {
        "model": str(tmp_path / "model.yaml"),
        "training": str(tmp_path / "training.yaml"),
        "params": str(tmp_path / "params.yaml"),
        "cli": COMMAND_LINE,
    }[top]
    # Make the top layer's lr negative and remove lr from every layer above it.
    for name in LAYER_ORDER[LAYER_ORDER.index(top) + 1 :]:
        if name == "cli":
            kwargs["overrides"]["training.lr"] = None
        else:
            path = tmp_path / f"{name}.yaml"
            data = read_yaml_mapping(path)
            data["training"].pop("lr", None)
            write(path, data)
    if top == "cli":
        kwargs["overrides"]["training.lr"] = -1.0
    else:
        path = tmp_path / f"{top}.yaml"
        data = read_yaml_mapping(path)
        data.setdefault("training", {})["lr"] = -1.0
        write(path, data)
    message = config_error(**kwargs)
    assert "training.lr" in message
    assert f"(in {source})" in message


@pytest.mark.parametrize(
    ("lower", "upper", "key"),
    [
        # a mapping replaces a scalar: the error is in the mapping's file
        ({"model": {"name": "tiny"}}, {"model": {"name": {"a": 1}}}, "model.name"),
        # a scalar replaces a section: the error is in the scalar's file
        (
            {"training": {"batch_ramp": {"start_tokens": 1, "ramp_tokens": 2}}},
            {"training": {"batch_ramp": 5}},
            "training.batch_ramp",
        ),
        ({"evaluation": {"batch_size": 2}}, {"evaluation": 7}, "evaluation"),
    ],
)
def test_blame_goes_to_the_layer_whose_value_won(
    tmp_path: Path, lower: dict[str, Any], upper: dict[str, Any], key: str
) -> None:
    model = write(tmp_path / "model.yaml", lower)
    training = write(tmp_path / "training.yaml", upper)
    params = write(tmp_path / "params.yaml", MINIMAL_TRAINING)
    message = config_error(params_file=params, model_config=model, training_config=training)
    assert f"{key}: " in message
    assert f"(in {training})" in message
    assert str(model) not in message


def test_overrides_that_are_none_are_ignored(tmp_path: Path) -> None:
    """Click passes None for an option that was not given: it must not erase a lower layer."""
    kwargs = write_layers(tmp_path, "params")
    kwargs["overrides"] = {"training.lr": None, "model.dropout": None}
    config = load_config(**kwargs)
    assert config.training.lr == pytest.approx(3e-4)


def test_params_selects_the_model_and_training_files(tmp_path: Path) -> None:
    model = write(tmp_path / "m.yaml", {"model": {"n_layer": 7}})
    training = write(tmp_path / "t.yaml", {"training": {"max_steps": 9, "global_batch_size": 3}})
    params = write(
        tmp_path / "params.yaml",
        {"model": {"config": str(model)}, "training": {"config": str(training)}},
    )
    config = load_config(params)
    assert config.model.n_layer == 7
    assert config.training.max_steps == 9
    assert config.model.config == str(model)
    assert config.training.config == str(training)


def test_explicit_files_replace_the_ones_params_names(tmp_path: Path) -> None:
    named_model = write(tmp_path / "named_m.yaml", {"model": {"n_layer": 7, "n_ctx": 64}})
    named_training = write(
        tmp_path / "named_t.yaml", {"training": {"max_steps": 9, "global_batch_size": 3}}
    )
    explicit_model = write(tmp_path / "explicit_m.yaml", {"model": {"n_layer": 3}})
    explicit_training = write(
        tmp_path / "explicit_t.yaml", {"training": {"max_tokens": 1000, "global_batch_size": 5}}
    )
    params = write(
        tmp_path / "params.yaml",
        {"model": {"config": str(named_model)}, "training": {"config": str(named_training)}},
    )
    config = load_config(params, model_config=explicit_model, training_config=explicit_training)
    assert config.model.n_layer == 3
    assert config.model.n_ctx == 256  # the named file's n_ctx is not read at all
    assert config.training.max_steps is None
    assert config.training.max_tokens == 1000
    assert config.model.config == str(explicit_model)
    assert config.training.config == str(explicit_training)


def test_config_overrides_select_files_too(tmp_path: Path) -> None:
    """`-S model.config=...` beats params.yaml's choice like any other flag."""
    named = write(tmp_path / "named.yaml", {"model": {"n_layer": 7}})
    other = write(tmp_path / "other.yaml", {"model": {"n_layer": 5}})
    params = write(tmp_path / "params.yaml", {"model": {"config": str(named)}, **MINIMAL_TRAINING})
    config = load_config(params, overrides={"model.config": str(other)})
    assert (config.model.n_layer, config.model.config) == (5, str(other))


def test_model_size_replaces_the_params_model_file(workdir: Path) -> None:
    config = load_config(workdir / "params.yaml", model_size="1.3B")
    assert config.model.name == "1.3B"
    assert config.model.n_head == 16
    assert config.model.config == str(Path("configs/model_configs/1.3B.yaml"))
    # params.yaml's own keys still beat the model file (training.lr and model.n_layer are
    # set there): the precedence the README states.
    assert config.training.lr == pytest.approx(3e-3)
    assert config.model.n_layer == 2


def test_model_size_picks_the_file_of_that_name(workdir: Path) -> None:
    assert model_config_path("1.3B") == Path("configs/model_configs/1.3B.yaml")
    config = load_config(
        model_size="175B", training_config="configs/training_configs/large_scale.yaml"
    )
    assert (config.model.n_layer, config.model.d_model) == (96, 12288)
    assert config.training.lr == pytest.approx(0.6e-4)


@pytest.mark.parametrize(("size", "hint"), [("1.3b", "1.3B"), ("175", "175B"), ("12M", "125M")])
def test_unknown_model_size_suggests_the_nearest(workdir: Path, size: str, hint: str) -> None:
    message = config_error(model_size=size)
    assert f"--model_size {size!r}" in message
    assert f"did you mean {hint!r}?" in message
    assert "known sizes: " in message and "175B" in message


def test_model_size_and_model_config_together_is_an_error(workdir: Path) -> None:
    message = config_error(model_size="125M", model_config="configs/model_configs/tiny.yaml")
    assert "not both" in message


def test_an_empty_section_does_not_erase_the_layers_below(tmp_path: Path) -> None:
    """`training:` with every key commented out is YAML null: it means "nothing to override"."""
    training = write(tmp_path / "t.yaml", {"training": {"max_steps": 9, "global_batch_size": 3}})
    params = write(tmp_path / "params.yaml", "evaluation:\nmodel:\n")
    config = load_config(params, training_config=training)
    assert config.training.max_steps == 9
    assert config.evaluation.batch_size == 8


def test_batch_ramp_null_still_switches_the_ramp_off(tmp_path: Path) -> None:
    params = write(
        tmp_path / "params.yaml", "training:\n  batch_ramp: null\n  global_batch_size: 8\n"
    )
    config = load_config(params, training_config=TRAINING_DIR / "large_scale.yaml")
    assert config.training.batch_ramp is None


def test_dotted_to_nested() -> None:
    assert dotted_to_nested({"training.lr": 1e-3, "training.max_steps": 5, "seed": 1}) == {
        "training": {"lr": 1e-3, "max_steps": 5},
        "seed": 1,
    }
    assert dotted_to_nested(
        {"training.batch_ramp": {"start_tokens": 1}, "training.batch_ramp.ramp_tokens": 2}
    ) == {"training": {"batch_ramp": {"start_tokens": 1, "ramp_tokens": 2}}}


@pytest.mark.parametrize(
    "overrides",
    [{"model": 3, "model.n_layer": 2}, {"model.n_layer": 2, "model": 3}, {"training..lr": 1}],
)
def test_conflicting_overrides_are_a_config_error(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=COMMAND_LINE):
        dotted_to_nested(overrides)


# --------------------------------------------------------------------------------------------
# Validation errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layer", "section", "key", "suggestion"),
    [
        ("params", "training", "lrr", "training.lr"),
        ("params", "data", "vocab", "data.vocab_size"),
        ("params", None, "trainig", "training"),
        ("params", "model", "lr", "training.lr"),  # the right name in the wrong section
        ("params", None, "n_layer", "model.n_layer"),
        ("model", "model", "n_layers", "model.n_layer"),
        ("model", "training", "warmup_token", "training.warmup_tokens"),
        ("training", "training", "weight_decy", "training.weight_decay"),
        ("training", "evaluation", "topk", "evaluation.top_k"),
    ],
)
def test_unknown_key_names_key_file_and_suggestion(
    tmp_path: Path, layer: str, section: str | None, key: str, suggestion: str
) -> None:
    files = {
        "model": {"model": {"n_layer": 2}},
        "training": {"training": {"max_steps": 5, "global_batch_size": 2}},
        "params": {"seed": 3},
    }
    target = files[layer] if section is None else files[layer].setdefault(section, {})
    target[key] = 1
    model = write(tmp_path / "model.yaml", files["model"])
    training = write(tmp_path / "training.yaml", files["training"])
    params = write(tmp_path / "params.yaml", files["params"])
    message = config_error(params_file=params, model_config=model, training_config=training)
    dotted = key if section is None else f"{section}.{key}"
    assert f"{dotted}: unknown key (in {tmp_path / f'{layer}.yaml'})" in message
    assert f"did you mean '{suggestion}'?" in message


def test_unknown_key_on_the_command_line(tmp_path: Path) -> None:
    params = write(tmp_path / "params.yaml", MINIMAL_TRAINING)
    message = config_error(params_file=params, overrides={"training.max_step": 3})
    assert "training.max_step: unknown key (in command line)" in message
    assert "did you mean 'training.max_steps'?" in message


@pytest.mark.parametrize(
    ("yaml_text", "key", "expect"),
    [
        ("model:\n  n_layer: four\n", "model.n_layer", "valid integer"),
        ("model:\n  n_layer: 2.5\n", "model.n_layer", "integer"),
        ("model:\n  n_layer: true\n", "model.n_layer", "not a boolean"),
        ("training:\n  lr: [0.1]\n", "training.lr", "valid number"),
        ("training:\n  lr: fast\n", "training.lr", "valid number"),
        ("training:\n  lr: .inf\n", "training.lr", "finite"),
        ("training:\n  betas: 0.9\n", "training.betas", "tuple"),
        ("training:\n  betas: [0.9, no]\n", "training.betas", "not a boolean"),
        ("training:\n  precision: fp8\n", "training.precision", "'fp32', 'fp16' or 'bf16'"),
        ("training:\n  batch_ramp: 5\n", "training.batch_ramp", "dictionary"),
        ("data:\n  inputs: corpus.txt\n", "data.inputs", "valid list"),
        ("data:\n  inputs: [1]\n", "data.inputs.0", "valid string"),
        ("tracking:\n  enabled: maybe\n", "tracking.enabled", "valid boolean"),
        ("registry:\n  model_name: {a: 1}\n", "registry.model_name", "valid string"),
        ("name: [a, b]\n", "name", "valid string"),
        ("model: 12\n", "model", "dictionary"),
        ("seed: 1.5\n", "seed", "integer"),
    ],
)
def test_wrong_type_names_key_and_file(
    tmp_path: Path, yaml_text: str, key: str, expect: str
) -> None:
    params = write(tmp_path / "params.yaml", yaml.safe_dump(MINIMAL_TRAINING) + yaml_text)
    if "training:" in yaml_text:  # one training section per file: merge it with the minimal one
        data = yaml.safe_load(yaml_text)
        data["training"] = {**MINIMAL_TRAINING["training"], **data["training"]}
        write(params, data)
    message = config_error(params_file=params)
    assert f"{key}: " in message
    assert expect in message
    assert f"(in {params})" in message


def test_wrong_literal_suggests_the_nearest_choice(tmp_path: Path) -> None:
    params = write(
        tmp_path / "params.yaml",
        {"training": {**MINIMAL_TRAINING["training"], "precision": "bf61"}},
    )
    assert "did you mean 'bf16'?" in config_error(params_file=params)


@pytest.mark.parametrize(
    ("model", "training", "keys"),
    [
        ({"d_model": 130, "n_head": 4}, {}, ["model.d_model", "model.n_head"]),
        ({"d_model": 128, "n_head": 4, "d_head": 16}, {}, ["model.d_head", "model.d_model"]),
        ({}, {"lr": -1e-4}, ["training.lr"]),
        ({}, {"lr": 0}, ["training.lr"]),
        ({"n_ctx": 64}, {"seq_len": 128}, ["training.seq_len", "model.n_ctx"]),
        ({}, {"max_steps": None}, ["training.max_steps", "training.max_tokens"]),
        (
            {},
            {"global_batch_size": None},
            ["training.global_batch_tokens", "training.global_batch_size"],
        ),
        ({}, {"betas": [0.9, 1.0]}, ["training.betas"]),
        ({}, {"min_lr_ratio": 1.5}, ["training.min_lr_ratio"]),
        ({}, {"max_steps": 0}, ["training.max_steps"]),
        ({}, {"batch_ramp": {"ramp_tokens": 5}}, ["training.batch_ramp.start_tokens"]),
        ({"dropout": 1.0}, {}, ["model.dropout"]),
        ({"n_layer": 0}, {}, ["model.n_layer"]),
    ],
)
def test_impossible_values_name_every_key_involved_and_its_file(
    tmp_path: Path, model: dict[str, Any], training: dict[str, Any], keys: list[str]
) -> None:
    model_file = write(tmp_path / "model.yaml", {"model": model} if model else {})
    training_file = write(
        tmp_path / "training.yaml", {"training": {**MINIMAL_TRAINING["training"], **training}}
    )
    message = config_error(model_config=model_file, training_config=training_file)
    assert f"{', '.join(keys)}: " in message, message
    blamed = training_file if training else model_file
    assert f"(in {blamed}" in message, message


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"val_fraction": -0.1}, "data.val_fraction"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
        ({"vocab_size": 100}, "data.vocab_size"),
        ({"num_workers": 0}, "data.num_workers"),
    ],
)
def test_data_ranges(tmp_path: Path, data: dict[str, Any], key: str) -> None:
    params = write(tmp_path / "params.yaml", {"data": data, **MINIMAL_TRAINING})
    message = config_error(params_file=params)
    assert message.startswith(f"invalid config: {key}: ")
    assert f"(in {params})" in message


def test_cross_field_error_names_each_file_involved(tmp_path: Path) -> None:
    """seq_len from one file, n_ctx from another: both files are named."""
    model = write(tmp_path / "model.yaml", {"model": {"n_ctx": 64}})
    training = write(tmp_path / "training.yaml", {"training": {**MINIMAL_TRAINING["training"]}})
    params = write(tmp_path / "params.yaml", {"training": {"seq_len": 128}})
    message = config_error(params_file=params, model_config=model, training_config=training)
    expected = "training.seq_len, model.n_ctx: training.seq_len (128) exceeds model.n_ctx (64)"
    assert expected in message
    assert f"(in {params}, {model})" in message


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    model = write(tmp_path / "model.yaml", {"model": {"n_layers": 4}})
    params = write(
        tmp_path / "params.yaml",
        {
            "data": {"val_fraction": 2},
            "training": {"lr": "fast", "max_steps": 1, "global_batch_size": 1},
            "tracking": {"enabled": []},
        },
    )
    message = config_error(params_file=params, model_config=model)
    for key in ["model.n_layers", "data.val_fraction", "training.lr", "tracking.enabled"]:
        assert f"{key}: " in message
    assert message.count("; ") >= 3


def test_very_many_problems_stay_readable(tmp_path: Path) -> None:
    params = write(tmp_path / "params.yaml", {"data": {"inputs": list(range(100))}})
    message = config_error(params_file=params)
    assert "... and " in message and len(message) < 2000


# --------------------------------------------------------------------------------------------
# File-level errors
# --------------------------------------------------------------------------------------------


def test_missing_params_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert config_error(params_file=missing) == f"{missing}: config file not found"


def test_missing_model_file_named_in_params(tmp_path: Path) -> None:
    params = write(tmp_path / "params.yaml", {"model": {"config": "configs/nope.yaml"}})
    message = config_error(params_file=params)
    assert message == f"model.config: config file configs/nope.yaml not found (in {params})"


def test_missing_training_file_given_explicitly(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    message = config_error(training_config=missing)
    assert message == f"training.config: config file {missing} not found (in command line)"


def test_a_relative_path_that_only_exists_beside_params_gets_a_hint(tmp_path: Path) -> None:
    write(tmp_path / "sub" / "m.yaml", {"model": {"n_layer": 2}})
    params = write(tmp_path / "sub" / "params.yaml", {"model": {"config": "m.yaml"}})
    message = config_error(params_file=params)
    assert f"did you mean {tmp_path / 'sub' / 'm.yaml'}?" in message


@pytest.mark.parametrize("value", [["a.yaml"], 5, {"path": "a.yaml"}])
def test_a_config_key_that_is_not_a_path(tmp_path: Path, value: Any) -> None:
    params = write(tmp_path / "params.yaml", {"training": {"config": value}})
    message = config_error(params_file=params)
    assert message.startswith("training.config: expected the path of a YAML file")
    assert f"(in {params})" in message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("seed: 1\nmodel:\n  n_layer: 2\n    d_model: 4\n", 4),
        ("seed: 1\ndata: [1, 2\n", 3),
        ("seed: 1\n\tname: x\n", 2),
        ("seed: 1\nname: 'unterminated\n", 3),
        ("seed: 1\nseed: 2\n", 2),  # duplicate keys: YAML would keep the last one silently
        ("seed: !!int one\n", 1),
        ("seed: 1\nname: \x00\n", 2),
    ],
)
@pytest.mark.parametrize("layer", ["params", "model", "training"])
def test_yaml_syntax_error_names_file_and_line(
    tmp_path: Path, text: str, line: int, layer: str
) -> None:
    path = write(tmp_path / f"{layer}.yaml", text)
    kwargs: dict[str, Any] = {
        "params": {"params_file": path},
        "model": {"model_config": path},
        "training": {"training_config": path},
    }[layer]
    message = config_error(**kwargs)
    assert message.startswith(f"{path}:{line}: YAML syntax error: "), message


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("42\n", "int"), ("hi\n", "str")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    path = write(tmp_path / "params.yaml", text)
    message = config_error(params_file=path)
    assert message == f"{path}: top level must be a mapping of sections, got {kind}"


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "model.yaml"
    path.write_bytes(b"model:\n  name: caf\xe9\n")
    assert config_error(model_config=path) == f"{path}:2: not UTF-8 text"


def test_empty_file_is_an_empty_layer(tmp_path: Path) -> None:
    path = write(tmp_path / "params.yaml", "# nothing yet\n")
    assert read_yaml_mapping(path) == {}
    assert load_config(path) == Config()


def test_dates_are_read_as_strings(tmp_path: Path) -> None:
    params = write(tmp_path / "params.yaml", "name: 2024-13-45\n")
    assert load_config(params).name == "2024-13-45"


def test_config_errors_are_user_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = write(tmp_path / "params.yaml", "model:\n  n_head: 3\n")

    @click.command()
    def load() -> None:
        load_config(params)

    with pytest.raises(SystemExit) as info:
        run_command(load, [])
    assert info.value.code == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.d_model, model.n_head" in err and str(params) in err
    assert issubclass(ConfigError, UserError)


def test_load_config_writes_nothing(workdir: Path) -> None:
    before = listing(workdir)
    load_config("params.yaml")
    with pytest.raises(ConfigError):
        load_config("params.yaml", overrides={"training.lr": -1})
    assert listing(workdir) == before


# --------------------------------------------------------------------------------------------
# The shipped configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", TRAINING_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("model", MODEL_FILES, ids=lambda p: p.stem)
def test_every_shipped_model_and_training_pair_resolves(model: Path, training: Path) -> None:
    config = load_config(model_config=model, training_config=training)
    assert config.model.name == model.stem
    assert config.seq_len <= config.model.n_ctx


def test_params_yaml_resolves_to_the_tiny_model_on_shakespeare_on_cpu(workdir: Path) -> None:
    config = load_config("params.yaml")
    assert config.model.name == "tiny"
    assert config.data.source == "shakespeare"
    assert config.training.device == "cpu"
    assert config.training.precision == "fp32"
    assert config.training.max_steps == 2800
    assert (config.model.n_layer, config.training.global_batch_size) == (2, 8)


@pytest.mark.parametrize("training", TRAINING_FILES, ids=lambda p: p.stem)
def test_params_yaml_with_each_training_config(workdir: Path, training: Path) -> None:
    load_config("params.yaml", training_config=training)


# Table 2.1 of Brown et al. 2020: n_layer, d_model, n_head, d_head, batch (tokens), lr.
# The table's 1.3B row (24 heads) and 13B row (d_model 5140) are inconsistent; see the files.
PAPER = {
    "125M": (12, 768, 12, 64, 0.5e6, 6.0e-4, 125e6),
    "350M": (24, 1024, 16, 64, 0.5e6, 3.0e-4, 350e6),
    "760M": (24, 1536, 16, 96, 0.5e6, 2.5e-4, 760e6),
    "1.3B": (24, 2048, 16, 128, 1e6, 2.0e-4, 1.3e9),
    "2.7B": (32, 2560, 32, 80, 1e6, 1.6e-4, 2.7e9),
    "6.7B": (32, 4096, 32, 128, 2e6, 1.2e-4, 6.7e9),
    "13B": (40, 5120, 40, 128, 2e6, 1.0e-4, 13e9),
    "175B": (96, 12288, 96, 128, 3.2e6, 0.6e-4, 175e9),
}
# The paper's batch sizes are whole numbers of 2048-token sequences: 256, 512, 1024, 1536.
PAPER_SEQUENCES = {"0.5M": 256, "1M": 512, "2M": 1024, "3.2M": 1536}


@pytest.mark.parametrize("size", GPT3_SIZES)
def test_gpt3_configs_match_table_2_1(size: str) -> None:
    n_layer, d_model, n_head, d_head, batch, lr, params = PAPER[size]
    config = load_config(
        model_config=MODEL_DIR / f"{size}.yaml",
        training_config=TRAINING_DIR / "large_scale.yaml",
    )
    model, training = config.model, config.training
    assert (model.n_layer, model.d_model, model.n_head, model.d_head) == (
        n_layer,
        d_model,
        n_head,
        d_head,
    )
    assert model.n_head * model.d_head == model.d_model
    assert model.d_ff == 4 * model.d_model
    assert model.n_ctx == 2048
    assert model.paper_params == params
    assert training.lr == pytest.approx(lr)
    tokens = training.global_batch_tokens
    assert tokens is not None and tokens % 2048 == 0
    assert tokens // 2048 in PAPER_SEQUENCES.values()
    assert abs(tokens - batch) / batch < 0.05
    # The d_head and d_ff in the file are explicit, not left to the schema's defaults.
    raw = read_yaml_mapping(MODEL_DIR / f"{size}.yaml")["model"]
    assert {"d_head", "d_ff", "n_ctx"} <= set(raw)


def test_the_two_inconsistent_rows_are_explained_in_comments() -> None:
    text_13 = (MODEL_DIR / "1.3B.yaml").read_text()
    comments_13 = " ".join(line for line in text_13.splitlines() if line.lstrip().startswith("#"))
    assert "24" in comments_13 and "16" in comments_13 and "d_model" in comments_13
    text_13b = (MODEL_DIR / "13B.yaml").read_text()
    comments_13b = " ".join(line for line in text_13b.splitlines() if line.lstrip().startswith("#"))
    assert "5140" in comments_13b and "5120" in comments_13b


def test_tiny_is_small() -> None:
    config = load_config(
        model_config=MODEL_DIR / "tiny.yaml", training_config=TRAINING_DIR / "cpu_debug.yaml"
    )
    assert config.model.n_layer <= 6 and config.model.d_model <= 256


def test_large_scale_carries_appendix_b() -> None:
    path = TRAINING_DIR / "large_scale.yaml"
    config = load_config(model_config=MODEL_DIR / "175B.yaml", training_config=path)
    training = config.training
    assert training.betas == (0.9, 0.95)
    assert training.eps == pytest.approx(1e-8)
    assert training.weight_decay == pytest.approx(0.1)
    assert training.grad_clip == pytest.approx(1.0)
    assert training.warmup_tokens == 375_000_000
    assert training.decay_tokens == 260_000_000_000
    assert training.min_lr_ratio == pytest.approx(0.1)
    assert training.max_tokens == 300_000_000_000
    raw = read_yaml_mapping(path)["training"]
    for key in ["log_level", "log_interval", "checkpoint_interval", "keep_checkpoints"]:
        assert key in raw, key
    # The learning rate and batch come from the model config, so the recipe serves every size.
    assert "lr" not in raw and "global_batch_tokens" not in raw


# --------------------------------------------------------------------------------------------
# Dump and flatten
# --------------------------------------------------------------------------------------------

ROUND_TRIPS = [
    {"params_file": "params.yaml"},
    {"model_size": "125M", "training_config": "configs/training_configs/large_scale.yaml"},
    {"model_size": "1.3B", "training_config": "configs/training_configs/small_scale.yaml"},
    {"params_file": "params.yaml", "overrides": {"training.lr": 3e-4, "name": "2024-01-15"}},
]


@pytest.mark.parametrize("kwargs", ROUND_TRIPS)
def test_dump_then_load_as_params_gives_an_equal_config(
    workdir: Path, kwargs: dict[str, Any]
) -> None:
    config = load_config(**kwargs)
    dumped = write(workdir / "resolved_config.yaml", dump_config(config))
    assert load_config(dumped) == config
    # Without the config files it names: the dump alone is the whole config.
    assert resolve([Layer(str(dumped), read_yaml_mapping(dumped))]) == config


def test_dump_is_in_field_order() -> None:
    dumped = yaml.safe_load(dump_config(Config()))
    assert list(dumped) == list(Config.model_fields)
    assert list(dumped["training"]) == list(Config.model_fields["training"].annotation.model_fields)


def test_flatten_config_keys_are_stable(workdir: Path) -> None:
    small_config = load_config("params.yaml")
    large_config = load_config(
        model_size="175B", training_config="configs/training_configs/large_scale.yaml"
    )
    small, large = flatten_config(small_config), flatten_config(large_config)
    assert list(small) == list(large)  # same keys, same order, whether batch_ramp is set or not
    assert small["training.lr"] == pytest.approx(3e-3)
    assert small["training.batch_ramp.start_tokens"] is None
    assert large["training.batch_ramp.start_tokens"] == 32768
    for key, value in large.items():
        assert all(part.isidentifier() for part in key.split(".")), key
        node: Any = large_config
        for part in key.split("."):
            node = getattr(node, part)
        assert value == (list(node) if isinstance(node, tuple) else node), key
