"""Property-based tests of the config system: mutate the valid shipped configs and check that
every invalid result is rejected, with the offending key (or file:line) and the file named in a
one-line ConfigError, that every valid one is accepted, and that loading writes nothing.

Each example is a fresh scratch checkout (params.yaml, configs/model_configs/tiny.yaml,
configs/training_configs/cpu_debug.yaml, copied from the repository and then mutated) loaded
with `load_config("params.yaml")` from inside it, exactly as the CLI does.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.config import Config, load_config
from pipeline.config.loader import read_yaml_mapping
from pipeline.config.schema import (
    DataConfig,
    DistributedConfig,
    EvaluationConfig,
    ModelConfig,
    RegistryConfig,
    TrackingConfig,
    TrainingConfig,
)
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ROLES = ("model", "training", "params")
"""The three files, lowest precedence first."""
PATHS = {
    "model": "configs/model_configs/tiny.yaml",
    "training": "configs/training_configs/cpu_debug.yaml",
    "params": "params.yaml",
}
BASE = {role: read_yaml_mapping(REPO / path) for role, path in PATHS.items()}
BASE["params"]["data"].pop("sources")
"""The properties mutate the single-source keys (data.source/inputs), which a mixture in
data.sources excludes; the sources themselves are checked in tests/test_sources_config.py."""
SECTIONS: dict[str | None, set[str]] = {
    None: set(Config.model_fields),
    "data": set(DataConfig.model_fields),
    "model": set(ModelConfig.model_fields),
    "training": set(TrainingConfig.model_fields),
    "evaluation": set(EvaluationConfig.model_fields),
    "tracking": set(TrackingConfig.model_fields),
    "registry": set(RegistryConfig.model_fields),
    "distributed": set(DistributedConfig.model_fields),
    "training.batch_ramp": {"start_tokens", "ramp_tokens"},
}

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --------------------------------------------------------------------------------------------
# The specification the mutations are judged against (written out here, not read from the
# schema, so a loosened bound in the schema fails a test).
# --------------------------------------------------------------------------------------------

INT_RANGES: dict[str, tuple[int, int | None]] = {
    "seed": (0, 2**64 - 1),  # torch.manual_seed's range
    "data.vocab_size": (257, 1_000_000),
    "data.num_workers": (1, 4096),
    "model.n_layer": (1, None),
    "model.n_ctx": (128, None),  # cpu_debug.yaml trains on 128-token sequences
    "training.seq_len": (1, 256),  # tiny.yaml's n_ctx
    "training.warmup_tokens": (0, None),
    "training.max_steps": (1, None),
    "training.global_batch_size": (1, None),
    "training.micro_batch_size": (1, None),
    "training.log_interval": (1, None),
    "training.eval_interval": (1, None),
    "training.eval_iters": (1, None),
    "training.checkpoint_interval": (1, None),
    "training.keep_checkpoints": (1, None),
    "training.max_nonfinite_steps": (0, None),
    "evaluation.max_tokens": (1, None),
    "evaluation.batch_size": (1, None),
    "evaluation.sample_max_tokens": (1, None),
    "tracking.queue_size": (1, None),
    "distributed.num_nodes": (1, None),
    "distributed.gpus_per_node": (1, None),
}
# (low, low is allowed, high, high is allowed)
FLOAT_RANGES: dict[str, tuple[float, bool, float | None, bool]] = {
    "data.val_fraction": (0.0, False, 1.0, False),
    "model.dropout": (0.0, True, 1.0, False),
    "training.lr": (0.0, False, None, False),
    "training.min_lr_ratio": (0.0, True, 1.0, True),
    "training.eps": (0.0, False, None, False),
    "training.weight_decay": (0.0, True, None, False),
    "training.grad_clip": (0.0, False, None, False),
    "evaluation.temperature": (0.0, True, None, False),
    "evaluation.top_p": (0.0, False, 1.0, True),
}
STR_FIELDS = [
    "name",
    "output_root",
    "data.jsonl_field",
    "data.prepared_dir",
    "model.name",
    "training.device",
    "tracking.uri",
    "tracking.experiment",
    "registry.model_name",
    "registry.metric",
]
BOOL_FIELDS = [
    "training.compile",
    "training.gradient_checkpointing",
    "tracking.enabled",
    "tracking.system_metrics",
    "registry.greater_is_better",
]
LITERAL_FIELDS: dict[str, list[str]] = {
    "data.source": ["shakespeare", "files"],
    "data.tokenizer": ["bpe", "gpt2"],
    "training.precision": ["fp32", "fp16", "bf16"],
    "training.log_level": ["DEBUG", "INFO", "WARNING", "ERROR"],
    "training.nonfinite_policy": ["skip", "rollback", "abort"],
    "tracking.log_checkpoints": ["none", "latest", "every"],
    "distributed.launcher": ["none", "torchrun", "deepspeed", "slurm"],
    "distributed.strategy": ["auto", "single", "ddp", "deepspeed", "fsdp"],
}
CONFINED = {
    "name": lambda v: v.strip() and v not in (".", "..") and not set(v) & set("/\\"),
    "output_root": lambda v: not os.path.normpath(v.replace("\\", "/")).startswith(".."),
}
"""Fields that place the run directory: valid only when it stays inside the project
(tests/test_paths_confined.py checks the refusals)."""
LIST_FIELDS = ["data.inputs", "evaluation.benchmarks", "evaluation.sample_prompts"]
OPTIONAL = {
    "training.max_steps",
    "training.global_batch_size",
    "training.seq_len",
    "evaluation.max_tokens",
    "training.grad_clip",
    "evaluation.top_p",
}
# Strings that pydantic's lax mode reads as booleans or as non-finite floats.
LAX_WORDS = {
    "0", "1", "f", "t", "n", "y", "no", "yes", "on", "off", "true", "false",
    "inf", "nan", "infinity",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@contextmanager
def chdir(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@dataclass
class Outcome:
    config: Config | None
    error: str | None


def load(files: dict[str, dict[str, Any] | str | bytes]) -> Outcome:
    """Write the three files into a fresh directory and load them as the CLI would."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for role, content in files.items():
            path = root / PATHS[role]
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            elif isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
        before = snapshot(root)
        with chdir(root):
            try:
                outcome = Outcome(load_config("params.yaml"), None)
            except ConfigError as exc:
                outcome = Outcome(None, str(exc))
        assert snapshot(root) == before, "load_config wrote to the directory"
    if outcome.error is not None:
        assert "\n" not in outcome.error, outcome.error
    return outcome


def base_files() -> dict[str, dict[str, Any]]:
    return copy.deepcopy(BASE)


def has_key(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def get_key(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node[part]
    return node


def set_key(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def del_key(data: dict[str, Any], dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[leaf]


def leaves(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(leaves(value, dotted + "."))
    return keys


def effective_role(files: dict[str, dict[str, Any]], dotted: str) -> str | None:
    """The highest-precedence file that sets `dotted` (all three files take part here)."""
    setters = [role for role in ROLES if has_key(files[role], dotted)]
    return setters[-1] if setters else None


def config_value(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def in_float_range(dotted: str, value: float) -> bool:
    low, low_ok, high, high_ok = FLOAT_RANGES[dotted]
    above = value > low or (low_ok and value == low)
    below = high is None or value < high or (high_ok and value == high)
    return above and below


def in_int_range(dotted: str, value: int) -> bool:
    low, high = INT_RANGES[dotted]
    return value >= low and (high is None or value <= high)


def check_outcome(
    files: dict[str, dict[str, Any]], role: str, dotted: str, value: Any, valid: bool
) -> None:
    """`value` was written at `dotted` in `role`'s file; judge the load against the spec."""
    outcome = load(files)
    winner = effective_role(files, dotted)
    if winner != role:  # a higher layer sets the key too: the mutation is overridden
        assert outcome.error is None, outcome.error
        assert winner is not None
        expected = get_key(files[winner], dotted)
        actual = config_value(outcome.config, dotted)
        assert (list(actual) if isinstance(actual, tuple) else actual) == expected
        return
    if valid:
        assert outcome.error is None, f"{dotted}={value!r} in {role} rejected: {outcome.error}"
        actual = config_value(outcome.config, dotted)
        assert (list(actual) if isinstance(actual, tuple) else actual) == value
    else:
        assert outcome.error is not None, f"{dotted}={value!r} in {role} was accepted"
        assert f"{dotted}" in outcome.error, outcome.error
        assert PATHS[role] in outcome.error, outcome.error


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

roles = st.sampled_from(ROLES)
words = st.from_regex(r"[A-Za-z][A-Za-z _-]{0,11}", fullmatch=True).filter(
    lambda w: w.strip().lower() not in LAX_WORDS
)
identifiers = st.from_regex(r"[a-z][a-z0-9_]{0,14}", fullmatch=True)
plain_text = st.text(st.characters(categories=("L", "N", "P", "Zs")), max_size=20)
scalars = st.one_of(st.integers(-5, 5), words, st.booleans(), st.none(), st.floats(-1, 1))


def floats_around(points: list[float]) -> st.SearchStrategy[float]:
    near = [p + d for p in points for d in (-1e-9, 0.0, 1e-9)]
    return st.one_of(
        st.sampled_from(near),
        st.floats(-10.0, 10.0, allow_nan=False),
        st.floats(-1e15, 1e15, allow_nan=False),
        st.integers(-10, 10).map(float),
    )


@st.composite
def numeric_mutations(draw: st.DrawFn) -> tuple[str, Any, bool]:
    """(dotted key, value, whether the spec allows it) for a numeric field."""
    if draw(st.booleans()):
        dotted = draw(st.sampled_from(sorted(INT_RANGES)))
        low, high = INT_RANGES[dotted]
        edges = [low - 1, low, low + 1] + ([high - 1, high, high + 1] if high else [])
        value = draw(st.one_of(st.sampled_from(edges), st.integers(-(10**12), 10**12)))
        return dotted, value, in_int_range(dotted, value)
    dotted = draw(st.sampled_from(sorted(FLOAT_RANGES)))
    low, _, high, _ = FLOAT_RANGES[dotted]
    value = draw(floats_around([low] + ([high] if high is not None else [])))
    return dotted, value, in_float_range(dotted, value)


@st.composite
def wrong_types(draw: st.DrawFn) -> tuple[str, Any]:
    """(dotted key, a value of the wrong type for it)."""
    containers = st.one_of(st.lists(st.integers(), min_size=1, max_size=3), st.just({"a": 1}))
    kind = draw(st.sampled_from(["int", "float", "str", "bool", "literal", "list", "none"]))
    if kind == "int":
        dotted = draw(st.sampled_from(sorted(INT_RANGES)))
        value = draw(st.one_of(words, containers, st.booleans(), st.sampled_from([2.5, -0.5])))
    elif kind == "float":
        dotted = draw(st.sampled_from(sorted(FLOAT_RANGES)))
        value = draw(
            st.one_of(words, containers, st.booleans(), st.sampled_from([float("inf"), "nan"]))
        )
    elif kind == "str":
        dotted = draw(st.sampled_from(STR_FIELDS))
        numbers = st.one_of(st.integers(), st.floats(allow_nan=False))
        value = draw(st.one_of(numbers, containers, st.booleans()))
    elif kind == "bool":
        dotted = draw(st.sampled_from(BOOL_FIELDS))
        value = draw(st.one_of(words, containers, st.sampled_from([0.5, 2, -1])))
    elif kind == "literal":
        dotted = draw(st.sampled_from(sorted(LITERAL_FIELDS)))
        value = draw(st.one_of(words, st.integers(), containers))
        assume(value not in LITERAL_FIELDS[dotted])
    elif kind == "list":
        dotted = draw(st.sampled_from(LIST_FIELDS))
        value = draw(st.one_of(words, st.integers(), st.just({"a": 1}), st.just([1, "x"])))
    else:
        required = [*INT_RANGES, *FLOAT_RANGES, *STR_FIELDS, *BOOL_FIELDS, *LITERAL_FIELDS]
        dotted = draw(st.sampled_from(sorted(set(required) - OPTIONAL)))
        value = None
    return dotted, value


@st.composite
def valid_values(draw: st.DrawFn) -> tuple[str, Any]:
    """(dotted key, a value the spec allows) for non-numeric fields."""
    kind = draw(st.sampled_from(["str", "bool", "literal", "list"]))
    if kind == "str":
        dotted, value = draw(st.sampled_from(STR_FIELDS)), draw(plain_text)
        assume(dotted not in CONFINED or CONFINED[dotted](value))
        return dotted, value
    if kind == "bool":
        return draw(st.sampled_from(BOOL_FIELDS)), draw(st.booleans())
    if kind == "literal":
        dotted = draw(st.sampled_from(sorted(LITERAL_FIELDS)))
        return dotted, draw(st.sampled_from(LITERAL_FIELDS[dotted]))
    return draw(st.sampled_from(LIST_FIELDS)), draw(st.lists(plain_text, max_size=3))


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


def test_the_unmutated_files_load() -> None:
    outcome = load(base_files())
    assert outcome.error is None, outcome.error
    assert outcome.config is not None and outcome.config.model.name == "tiny"


@SETTINGS
@given(role=roles, section=st.sampled_from(list(SECTIONS)), key=identifiers, value=scalars)
def test_unknown_keys_are_rejected_naming_key_and_file(
    role: str, section: str | None, key: str, value: Any
) -> None:
    assume(key not in SECTIONS[section])
    files = base_files()
    dotted = key if section is None else f"{section}.{key}"
    set_key(files[role], dotted, value)
    outcome = load(files)
    assert outcome.error is not None, f"{dotted} in {role} was accepted"
    assert f"{dotted}: unknown key (in {PATHS[role]})" in outcome.error, outcome.error


@SETTINGS
@given(role=roles, mutation=wrong_types())
def test_wrong_types_are_rejected_naming_key_and_file(role: str, mutation: tuple[str, Any]) -> None:
    dotted, value = mutation
    files = base_files()
    set_key(files[role], dotted, value)
    check_outcome(files, role, dotted, value, valid=False)


@SETTINGS
@given(role=roles, mutation=numeric_mutations())
def test_numbers_are_checked_against_their_ranges(
    role: str, mutation: tuple[str, Any, bool]
) -> None:
    dotted, value, valid = mutation
    files = base_files()
    set_key(files[role], dotted, value)
    check_outcome(files, role, dotted, value, valid)


@SETTINGS
@given(role=roles, mutation=valid_values())
def test_valid_values_are_accepted(role: str, mutation: tuple[str, Any]) -> None:
    dotted, value = mutation
    files = base_files()
    set_key(files[role], dotted, value)
    check_outcome(files, role, dotted, value, valid=True)


@SETTINGS
@given(
    role=roles,
    beta1=floats_around([0.0, 1.0]),
    beta2=floats_around([0.0, 1.0]),
)
def test_betas_must_lie_in_0_1(role: str, beta1: float, beta2: float) -> None:
    files = base_files()
    set_key(files[role], "training.betas", [beta1, beta2])
    valid = 0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0
    check_outcome(files, role, "training.betas", [beta1, beta2], valid)


@SETTINGS
@given(n_head=st.integers(1, 64), d_head=st.one_of(st.none(), st.integers(1, 256)))
def test_head_shapes(n_head: int, d_head: int | None) -> None:
    """n_head must divide d_model (128) and n_head * d_head must equal it."""
    files = base_files()
    set_key(files["model"], "model.n_head", n_head)
    if d_head is None:
        del_key(files["model"], "model.d_head")
    else:
        set_key(files["model"], "model.d_head", d_head)
    outcome = load(files)
    divides = 128 % n_head == 0
    valid = divides and (d_head is None or n_head * d_head == 128)
    if valid:
        assert outcome.config is not None, outcome.error
        assert outcome.config.model.d_head == 128 // n_head
    else:
        assert outcome.error is not None
        assert "model.n_head" in outcome.error and PATHS["model"] in outcome.error
        if divides:
            assert "model.d_head" in outcome.error


def participating(files: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The layers load_config reads, lowest first, by what params.yaml names."""
    params = files["params"]
    layers = []
    for role in ("model", "training"):
        section = params.get(role)
        if isinstance(section, dict) and section.get("config"):
            layers.append(files[role])
    return [*layers, params]


@SETTINGS
@given(role=roles, data=st.data())
def test_missing_keys_and_sections(role: str, data: st.DataObject) -> None:
    """Deleting keys or whole sections gives a valid config, or names what is now missing."""
    files = base_files()
    present = leaves(files[role])
    doomed = data.draw(st.lists(st.sampled_from(present), min_size=1, max_size=4, unique=True))
    for dotted in sorted(doomed, key=len):  # parents first; children may then be gone already
        if has_key(files[role], dotted):
            del_key(files[role], dotted)
    outcome = load(files)

    training: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for layer in participating(files):
        training.update(layer.get("training") or {})
        model.update(layer.get("model") or {})
    if not any(layer.get("training") is not None for layer in participating(files)):
        # No layer mentions training at all: the built-in section (100 steps of 8) applies.
        training = {"max_steps": 100, "global_batch_size": 8}
    has_end = training.get("max_steps") is not None or training.get("max_tokens") is not None
    batch_keys = ("global_batch_tokens", "global_batch_size")
    has_batch = any(training.get(key) is not None for key in batch_keys)
    fits = (training.get("seq_len") or 0) <= model.get("n_ctx", 256)
    if has_end and has_batch and fits:
        assert outcome.error is None, outcome.error
        return
    assert outcome.error is not None
    if not has_end:
        assert "training.max_steps, training.max_tokens" in outcome.error, outcome.error
    if not has_batch:
        assert "training.global_batch_tokens, training.global_batch_size" in outcome.error
    if not fits:
        assert "training.seq_len, model.n_ctx" in outcome.error, outcome.error


GARBAGE = ["@oops: 1", "`tick: 1", "\tkey: 1", "a: b: c", "]", "}", "*undefined: 1", "key: 'x' y'"]


@SETTINGS
@given(role=roles, garbage=st.sampled_from(GARBAGE), data=st.data())
def test_yaml_syntax_errors_name_file_and_line(
    role: str, garbage: str, data: st.DataObject
) -> None:
    lines = yaml.safe_dump(BASE[role], sort_keys=False).splitlines()
    at = data.draw(st.integers(0, len(lines)))
    lines.insert(at, garbage)
    files: dict[str, Any] = base_files()
    files[role] = "\n".join(lines) + "\n"
    outcome = load(files)
    assert outcome.error is not None
    assert outcome.error.startswith(f"{PATHS[role]}:{at + 1}: YAML syntax error: "), outcome.error


@SETTINGS
@given(role=roles, data=st.data())
def test_non_utf8_bytes_name_file_and_line(role: str, data: st.DataObject) -> None:
    lines = yaml.safe_dump(BASE[role], sort_keys=False).encode().splitlines()
    at = data.draw(st.integers(0, len(lines) - 1))
    lines[at] += data.draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9t\xe9", b"\x80abc"]))
    files: dict[str, Any] = base_files()
    files[role] = b"\n".join(lines) + b"\n"
    outcome = load(files)
    assert outcome.error == f"{PATHS[role]}:{at + 1}: not UTF-8 text"


yamlish = st.text(
    alphabet=st.sampled_from([*" \n\t:-?[]{},'\"#&*!|>%@`~.abcxyz019", "\x00", "é"]),
    max_size=80,
)


@SETTINGS
@given(role=roles, text=st.one_of(yamlish, st.text(max_size=60)))
def test_any_text_loads_or_is_a_config_error(role: str, text: str) -> None:
    """Whatever a file holds, the result is a Config or a one-line ConfigError, never a crash;
    a YAML error always names the file and a line."""
    files: dict[str, Any] = base_files()
    files[role] = text
    outcome = load(files)  # any other exception fails the test
    if outcome.error is not None and "YAML syntax error" in outcome.error:
        assert re.match(rf"{re.escape(PATHS[role])}:\d+: YAML syntax error: ", outcome.error)


def range_edges() -> list[tuple[str, Any, bool]]:
    """Both sides of every bound in the spec, so each edge is checked on every run."""
    cases: list[tuple[str, Any, bool]] = []
    for dotted, (low, high) in INT_RANGES.items():
        for value in [low - 1, low] + ([high, high + 1] if high is not None else [10**12]):
            cases.append((dotted, value, in_int_range(dotted, value)))
    for dotted, (low, _, high, _) in FLOAT_RANGES.items():
        points = [low - 1e-9, low, low + 1e-9] + (
            [high - 1e-9, high, high + 1e-9] if high is not None else [1e12]
        )
        cases.extend((dotted, value, in_float_range(dotted, value)) for value in points)
    return cases


@pytest.mark.parametrize(("dotted", "value", "valid"), range_edges())
def test_every_range_edge(dotted: str, value: Any, valid: bool) -> None:
    files = base_files()
    set_key(files["params"], dotted, value)  # params.yaml is the top file layer: never masked
    check_outcome(files, "params", dotted, value, valid)
