"""`gpt3 rerun runs:/<run_id>` (`gpt3 train --rerun ...`): train a logged run again from its record.

The record is what the run logged: the artifact `resolved_config.yaml` (every value it trained
with) and the tags `git.commit`, `git.uncommitted` (or, for runs logged before that tag,
`git.dirty`) and `data.hash`. Before anything is written, the rerun checks that the code and the
data are the run's:

- this checkout's HEAD is the run's commit, with the same uncommitted changes (none, usually;
  params.yaml and dvc.lock do not count, see `run_metadata.uncommitted_changes`);
- the prepared data the config names hashes to the run's `data.hash` (its meta.json files,
  combined as training combines them).

A mismatch is one line naming every difference. `--force` trains anyway and records those
differences in the tag `rerun.forced`. The new run is tagged `rerun_of=<run_id>`; `--set` values
go on top of the record (e.g. where the same prepared data lies on this machine: the data hash
still guards it) and are recorded in `rerun.overrides`.

Where: `--output_dir`, else `<output_root>/<name>-rerun-<first 8 digits of the run id>` (a
relative output_root of the record, else `experiments/`). It resumes like the DVC stage
(`auto`): an interrupted rerun continues, a finished one is moved aside and trained again.
The rerun logs to the store its record came from: `MLFLOW_TRACKING_URI`, else `tracking.uri`
of params.yaml (`--params`), else the default store.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.config.layers import COMMAND_LINE, Layer, dotted_to_nested, resolve
from pipeline.config.schema import Config, TrackingConfig
from pipeline.config.yaml_reader import read_yaml_mapping
from pipeline.data.prepared import load_meta
from pipeline.data.sources import data_sources
from pipeline.errors import ConfigError, UserError
from pipeline.tracking.mlflow_setup import resolve_tracking_uri
from pipeline.tracking.run_metadata import git_state
from pipeline.tracking.run_reader import RunReader, RunUri, parse_run_uri
from pipeline.training.components import mixture_data_hash

RESOLVED_CONFIG = "resolved_config.yaml"
DEFAULT_ROOT = "experiments"


class RerunMismatchError(UserError):
    """The checkout or the prepared data differ from the run's record (see `--force`)."""


@dataclass
class Rerun:
    """What to train, the tags that link it to its record, and what differs (forced)."""

    config: Config
    tags: dict[str, str]
    differences: list[str]


def record_tracking_uri(params_file: str | None) -> str:
    """The store to read records from: MLFLOW_TRACKING_URI, params.yaml's, else the default."""
    configured = TrackingConfig().uri
    path = Path(params_file or "params.yaml")
    if params_file is not None or path.is_file():
        tracking = read_yaml_mapping(path).get("tracking")
        if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str):
            configured = tracking["uri"]
    return resolve_tracking_uri(configured)


def fetch_record(uri: RunUri, tracking_uri: str) -> tuple[Any, dict[str, Any]]:
    """(the MLflow run, its resolved config as a mapping); read through a temporary folder."""
    reader = RunReader(tracking_uri, TrackingConfig().request_timeout_s)
    run = reader.run(uri)
    if RESOLVED_CONFIG not in reader.listing(uri, ""):
        raise ConfigError(
            f"{uri.text}: MLflow run {uri.run_id} has no {RESOLVED_CONFIG} artifact (not a run "
            "of this pipeline, or one that never got to log it)"
        )
    folder = Path(tempfile.mkdtemp(prefix="gpt3-rerun-"))
    try:
        reader.download(uri, [RESOLVED_CONFIG], folder)
        try:
            values = read_yaml_mapping(folder / RESOLVED_CONFIG)  # safe YAML: builds no objects
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(folder), f"runs:/{uri.run_id}")) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return run, values


def default_output_dir(values: dict[str, Any], run_id: str) -> str:
    """`<output_root>/<name>-rerun-<id[:8]>`, in this project when the record's root was not."""
    root = values.get("output_root")
    if not isinstance(root, str) or not root or PurePosixPath(root).is_absolute():
        root = DEFAULT_ROOT
    name = values.get("name") if isinstance(values.get("name"), str) else "run"
    return f"{root}/{name}-rerun-{run_id[:8]}"


def rebuild_config(
    values: dict[str, Any],
    uri: RunUri,
    tracking_uri: str,
    output_dir: str | None,
    overrides: dict[str, Any],
) -> Config:
    """The record's config, with this rerun's place, store and `--set` values on top."""
    cli = {
        "output_dir": output_dir or default_output_dir(values, uri.run_id),
        "tracking.uri": tracking_uri,  # the record's may be redacted; this is where it came from
        **overrides,
    }
    return resolve(
        [
            Layer(f"{uri.text} {RESOLVED_CONFIG}", values),
            Layer(COMMAND_LINE, dotted_to_nested(cli)),
        ]
    )


def prepared_data_hash(config: Config) -> str:
    """The data hash training would record for `config` (DataError if the data is missing)."""
    specs = data_sources(config.data)
    return mixture_data_hash(specs, [load_meta(spec.folder) for spec in specs])


def code_differences(recorded: dict[str, str], here: dict[str, str]) -> list[str]:
    """How this checkout's git state differs from the run's tags (empty: the same code)."""
    found = []
    commit, current = recorded.get("git.commit"), here.get("git.commit")
    if not commit:
        found.append("the run records no git commit")
    elif not current:
        found.append(f"the run's commit is {commit[:12]}, and this directory is not a git checkout")
    elif commit != current:
        found.append(f"git commit: the run's {commit[:12]}, this checkout's {current[:12]}")
    changes = recorded.get("git.uncommitted")
    if changes is not None:
        now = here.get("git.uncommitted")
        if now != changes:
            if changes == "none":
                found.append("this checkout has uncommitted changes the run did not have")
            elif now == "none":
                found.append("the run had uncommitted changes that this checkout does not")
            else:
                found.append("the uncommitted changes differ from the run's")
        return found
    if recorded.get("git.dirty") == "true":  # a record from before git.uncommitted
        found.append("the run was trained with uncommitted changes (git.dirty=true)")
    if here.get("git.dirty") == "true":
        found.append("this checkout has uncommitted changes")
    return found


def data_difference(recorded: str | None, config: Config) -> list[str]:
    """How the prepared data differs from the run's `data.hash` (empty: the same data)."""
    current = prepared_data_hash(config)
    folders = ", ".join(str(spec.folder) for spec in data_sources(config.data))
    if not recorded:
        return ["the run records no data.hash"]
    if recorded != current:
        return [
            f"data.hash: the run's {recorded[:12]}, the prepared data's {current[:12]} ({folders})"
        ]
    return []


def plan_rerun(
    text: str,
    *,
    force: bool,
    output_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
    params_file: str | None = None,
) -> Rerun:
    """Read the record, rebuild the config, compare code and data (see the module docstring)."""
    uri = parse_run_uri(text)
    if uri.path:
        raise ConfigError(f"--rerun takes a run, runs:/{uri.run_id}, not an artifact ({text})")
    tracking_uri = record_tracking_uri(params_file)
    run, values = fetch_record(uri, tracking_uri)
    overrides = overrides or {}
    config = rebuild_config(values, uri, tracking_uri, output_dir, overrides)
    tags = run.data.tags
    differences = code_differences(tags, git_state()) + data_difference(
        tags.get("data.hash"), config
    )
    if differences and not force:
        raise RerunMismatchError(
            f"cannot rerun {text} as it ran: {'; '.join(differences)}; --force reruns it anyway "
            "(recorded in the tag rerun.forced)"
        )
    rerun_tags = {"rerun_of": uri.run_id}
    if overrides:
        rerun_tags["rerun.overrides"] = json.dumps(overrides, sort_keys=True)
    if differences:
        rerun_tags["rerun.forced"] = "; ".join(differences)
    return Rerun(config, rerun_tags, differences)
