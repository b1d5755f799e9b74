"""Register a trained model and move the `champion` alias to it only if it is better.

Model-registry stages are deprecated in MLflow 3, so the state lives in aliases and tags:
- every promoted run becomes a version of `registry.model_name` (once: promoting the same run
  again reuses its version), tagged with its metrics, the data hash and the decision;
- `champion` moves to the new version only if it beats the current champion on
  `registry.metric` (strictly; ties keep the incumbent), else the version gets `challenger`;
- and only if the two were measured alike: the same validation data, tokenizer and evaluation
  settings (`comparable.py`); otherwise the new version is `challenger` and the reason says
  what differs;
- `force` moves `champion` regardless; a missing number is never read as "better".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.schema import Config, RegistryConfig
from pipeline.registry.candidate import Candidate, load_candidate, run_metrics
from pipeline.registry.comparable import comparison_tags, differences
from pipeline.tracking.mlflow_setup import configure_environment, resolve_tracking_uri

DECISION_TAG = "promotion.decision"
REASON_TAG = "promotion.reason"
SOURCE_TAG = "promotion.metric_source"


@dataclass
class Decision:
    """What promotion did, with both numbers it compared."""

    model_name: str
    version: str
    alias: str
    """The alias the new version got: the champion alias or the challenger alias."""
    reason: str
    promoted: bool
    """Whether the champion alias now points at this version."""
    metric: str
    value: float | None
    champion_version: str | None
    champion_value: float | None
    candidate: Candidate
    reused: bool = False

    def lines(self) -> list[str]:
        c = self.candidate
        new = _fmt(self.value)
        lines = [*c.notes]
        again = " (already registered)" if self.reused else ""
        lines.append(
            f"{self.model_name} version {self.version}{again}: run {c.run_id}, "
            f"{self.metric} {new} (from {c.metric_source})"
        )
        if self.champion_version is None:
            lines.append("current champion: none")
        else:
            lines.append(
                f"current champion: version {self.champion_version}, "
                f"{self.metric} {_fmt(self.champion_value)}"
            )
        lines.append(f"decision: {self.alias} -> version {self.version}: {self.reason}")
        return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _beats(new: float, old: float, greater_is_better: bool) -> bool:
    return new > old if greater_is_better else new < old


def _aliased(client: Any, name: str, alias: str) -> Any | None:
    """The version `alias` points at, or None (read from the model: a missing alias is no error)."""
    version = client.get_registered_model(name).aliases.get(alias)
    return client.get_model_version(name, str(version)) if version is not None else None


def _version_metric(client: Any, version: Any, metric: str) -> float | None:
    """A version's value of `metric`: its tag, else its run's final metric."""
    raw = version.tags.get(metric)
    if raw is None and version.run_id:
        raw = run_metrics(client.get_run(version.run_id)).get(metric)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _register(client: Any, name: str, candidate: Candidate) -> tuple[Any, bool]:
    """The registry version of the candidate's model: the existing one, or a new one."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.get_http_status_code() != 400 or "already exists" not in str(exc).lower():
            raise
    existing = [
        v
        for v in client.search_model_versions(f"name = '{name}' AND run_id = '{candidate.run_id}'")
        if v.source == candidate.model_location
    ]
    if existing:
        return max(existing, key=lambda v: int(v.version)), True
    # The source is the artifact location itself: given `models:/<id>`, MLflow's sqlite
    # registry would look the model up through the process-global tracking URI.
    version = client.create_model_version(
        name,
        source=candidate.model_location,
        run_id=candidate.run_id,
        model_id=candidate.model_id,
    )
    return version, False


def decide(
    registry: RegistryConfig,
    value: float | None,
    champion_value: float | None,
    champion_version: str | None,
    version: str,
    force: bool,
) -> tuple[bool, str]:
    """(move champion?, why), from the two numbers; see the module docstring."""
    metric = registry.metric
    direction = "higher" if registry.greater_is_better else "lower"
    if force:
        return True, f"forced (--force); {metric} {_fmt(value)} vs champion {_fmt(champion_value)}"
    if champion_version is None:
        return True, "no champion yet"
    if champion_version == version:
        return True, "already the champion"
    if value is None:
        return False, f"this run has no {metric} to compare (evaluate it, or use --force)"
    if champion_value is None:
        return False, (
            f"champion version {champion_version} has no {metric} to compare; use --force"
        )
    if _beats(value, champion_value, registry.greater_is_better):
        return True, f"{_fmt(value)} beats {_fmt(champion_value)} ({direction} {metric} is better)"
    return False, (
        f"{_fmt(value)} does not beat champion {_fmt(champion_value)} ({direction} {metric} is "
        "better); use --force to promote anyway"
    )


def _record(
    client: Any,
    name: str,
    number: str,
    candidate: Candidate,
    alias: str,
    why: str,
    compared: dict[str, str],
) -> None:
    """Version tags: the candidate's metrics, what it was measured on (data hash, tokenizer,
    evaluation settings) and what promotion decided."""
    tags = {key: str(value) for key, value in candidate.metrics.items()}
    tags.update({DECISION_TAG: alias, REASON_TAG: why[:5000], SOURCE_TAG: candidate.metric_source})
    tags.update(compared)
    for key, text in tags.items():
        client.set_model_version_tag(name, number, key, text)


def promote(
    config: Config, run_id: str | None = None, force: bool = False, client: Any = None
) -> Decision:
    """Register the model of `config`'s run directory and decide the aliases (module docstring)."""
    registry = config.registry
    if client is None:
        from mlflow import MlflowClient

        configure_environment(config.tracking.request_timeout_s)
        uri = resolve_tracking_uri(config.tracking.uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = registry.model_name
    candidate = load_candidate(client, Path(config.run_dir), run_id)
    version, reused = _register(client, name, candidate)
    number = str(version.version)  # the SQLite store says 3, a server "3"
    value = candidate.metrics.get(registry.metric)
    champion = _aliased(client, name, registry.champion_alias)
    champion_number = str(champion.version) if champion else None
    champion_value = _version_metric(client, champion, registry.metric) if champion else None
    to_champion, reason = decide(registry, value, champion_value, champion_number, number, force)
    compared = comparison_tags(candidate, config.evaluation, Path(config.run_dir) / "model")
    unlike = differences(compared, champion.tags) if champion else []
    if unlike and champion_number != number:
        if force:
            reason += f" (not measured alike: {'; '.join(unlike)})"
        elif to_champion:
            to_champion = False
            reason = (
                f"not comparable with champion version {champion_number}: {'; '.join(unlike)}; "
                "the champion stays (use --force to promote anyway)"
            )
    alias = registry.champion_alias if to_champion else registry.challenger_alias
    client.set_registered_model_alias(name, alias, number)
    if to_champion:
        challenger = _aliased(client, name, registry.challenger_alias)
        if challenger is not None and str(challenger.version) == number:
            client.delete_registered_model_alias(name, registry.challenger_alias)
    _record(client, name, number, candidate, alias, reason, compared)
    return Decision(
        model_name=name,
        version=number,
        alias=alias,
        reason=reason,
        promoted=to_champion,
        metric=registry.metric,
        value=value,
        champion_version=champion_number,
        champion_value=champion_value,
        candidate=candidate,
        reused=reused,
    )
