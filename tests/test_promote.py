"""Registry promotion against a real SQLite store: champion only when better, `--force`, tags.

Three tiny runs are trained once for the module: `base` (8 steps), `better` (more steps, so a
lower validation loss) and `worse` (2 steps). Their final `val/loss` decides unless an
`eval.json` says otherwise.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_overrides

from pipeline.cli.promote import promote as promote_command
from pipeline.config.loader import load_config
from pipeline.config.schema import RegistryConfig
from pipeline.data.prepare import load_meta, prepare_data
from pipeline.errors import UserError
from pipeline.registry.promote import decide, promote
from pipeline.training.run import train

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

RUNS = {
    "base": {"training.max_steps": 8},
    "better": {"training.max_steps": 24, "training.lr": 3e-3, "training.decay_tokens": None},
    "worse": {"training.max_steps": 2, "training.eval_interval": 2},
}


@dataclass
class Trained:
    store: str
    prepared: Path
    run_dirs: dict[str, Path]
    val_loss: dict[str, float]

    def config(self, name: str, model_name: str, extra: dict | None = None):
        """The config of run `name`, registering into `model_name`."""
        overrides = {
            "tracking.enabled": True,
            "tracking.uri": self.store,
            "registry.model_name": model_name,
            **RUNS[name],
            **(extra or {}),
        }
        return load_config(overrides=tiny_overrides(self.prepared, self.run_dirs[name], overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, prepared_dir: Path) -> Trained:
    root = tmp_path_factory.mktemp("promote")
    store = f"sqlite:///{root / 'mlflow.db'}"
    run_dirs, val_loss = {}, {}
    with pytest.MonkeyPatch.context() as env:
        for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
            env.delenv(name, raising=False)
        for name in RUNS:
            run_dirs[name] = root / name
            config = Trained(store, prepared_dir, run_dirs, {}).config(name, "unused")
            result = train(config, console=False)
            val_loss[name] = result.val_losses[max(result.val_losses)]
    assert val_loss["better"] < val_loss["base"] < val_loss["worse"], val_loss
    return Trained(store, prepared_dir, run_dirs, val_loss)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(model_name).aliases.items()}


def test_champion_moves_only_to_a_better_model(trained: Trained, prepared_dir: Path) -> None:
    client = MlflowClient(trained.store)
    name = "tiny-sequence"

    first = promote(trained.config("base", name))
    assert (first.alias, first.version, first.reason) == ("champion", "1", "no champion yet")
    assert first.value == pytest.approx(trained.val_loss["base"])

    better = promote(trained.config("better", name))
    assert (better.alias, better.version, better.champion_version) == ("champion", "2", "1")
    assert better.champion_value == pytest.approx(trained.val_loss["base"])
    assert better.value == pytest.approx(trained.val_loss["better"])
    assert "beats" in better.reason

    worse = promote(trained.config("worse", name))
    assert (worse.alias, worse.promoted) == ("challenger", False)
    assert "does not beat" in worse.reason and "--force" in worse.reason
    assert _aliases(client, name) == {"champion": "2", "challenger": "3"}

    # --force through the command line: it prints the decision and both numbers.
    result = CliRunner().invoke(
        promote_command,
        [
            "--run_dir",
            str(trained.run_dirs["worse"]),
            "--force",
            "--set",
            f"tracking.uri={trained.store}",
            "--set",
            f"registry.model_name={name}",
            "--set",
            f"data.prepared_dir={prepared_dir}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "already registered" in result.output  # the same run keeps its version
    assert "decision: champion -> version 3: forced" in result.output
    assert f"{trained.val_loss['worse']:.6g}" in result.output
    assert f"{trained.val_loss['better']:.6g}" in result.output
    assert _aliases(client, name) == {"champion": "3"}  # challenger left the new champion

    again = promote(trained.config("better", name))  # back to the better one, no new version
    assert (again.alias, again.version, again.reused) == ("champion", "2", True)
    assert len(client.search_model_versions(f"name = '{name}'")) == 3

    version = client.get_model_version(name, "2")
    assert version.tags["data.hash"] == load_meta(prepared_dir).data_hash
    assert float(version.tags["val_loss"]) == pytest.approx(trained.val_loss["better"])
    assert version.tags["promotion.decision"] == "champion"
    assert version.run_id == better.candidate.run_id


def _evaluated(trained: Trained, run: str, where: Path, metrics: dict) -> Path:
    """A run directory holding `run`'s model and an eval.json with `metrics`."""
    shutil.copytree(trained.run_dirs[run] / "model", where / "model")
    (where / "metrics").mkdir()
    (where / "metrics" / "eval.json").write_text(json.dumps(metrics))
    return where


def test_eval_json_decides_when_present(trained: Trained, tmp_path: Path) -> None:
    """The evaluate stage's numbers win over the training run's last val/loss, and are compared
    only with numbers the evaluate stage measured with the same settings."""
    name = "tiny-eval"
    champion_dir = _evaluated(trained, "base", tmp_path / "base", {"val_loss": 9.0})
    promote(trained.config("base", name, {"output_dir": str(champion_dir)}))
    # A lower val/loss measured by the training run itself is not comparable: champion stays.
    by_run = promote(trained.config("better", name))
    assert by_run.value < 9.0 and (by_run.alias, by_run.promoted) == ("challenger", False)
    assert "not comparable with champion version 1: other evaluation settings" in by_run.reason
    assert '"measured_by": "training run"' in by_run.reason

    metrics = {"val_loss": 1.5, "val_perplexity": 4.48, "val_accuracy": None}
    run_dir = _evaluated(trained, "worse", tmp_path / "evaluated", metrics)
    config = trained.config("worse", name, {"output_dir": str(run_dir)})
    decision = promote(config)
    assert decision.alias == "champion" and decision.value == 1.5, decision.reason
    assert decision.candidate.metric_source.endswith("eval.json")
    tags = MlflowClient(trained.store).get_model_version(name, decision.version).tags
    assert tags["val_perplexity"] == "4.48" and "val_accuracy" not in tags
    assert json.loads(tags["evaluation.settings"])["measured_by"] == "evaluate stage"

    # A better number measured on another token budget is not a better model either.
    budget = _evaluated(trained, "better", tmp_path / "budget", {"val_loss": 1.0})
    overrides = {"output_dir": str(budget), "evaluation.max_tokens": 512}
    other = promote(trained.config("better", name, overrides))
    assert (other.alias, other.promoted) == ("challenger", False)
    assert f"champion version {decision.version}: other evaluation settings" in other.reason
    assert '"max_tokens": 512' in other.reason and "--force" in other.reason
    assert _aliases(MlflowClient(trained.store), name)["champion"] == decision.version


def test_champion_stays_when_the_candidate_saw_other_data(
    trained: Trained, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The README's "your own data" example: a few steps on three small files with a tiny
    vocabulary reach a lower val_loss than the champion, which says nothing; the champion
    stays unless `--force`. A champion registered before versions recorded what they were
    measured on cannot be compared either."""
    corpus = tmp_path_factory.mktemp("own_corpus")
    for number in range(3):
        (corpus / f"{number}.txt").write_text(f"my own words, file {number}. " * 300)
    prepared = tmp_path_factory.mktemp("own_prepared") / "prepared"
    prepare_data(
        load_config(
            overrides={
                "data.sources": {},
                "data.source": "files",
                "data.inputs": [str(corpus / "*.txt")],
                "data.vocab_size": 300,
                "data.val_fraction": 0.34,
                "data.prepared_dir": str(prepared),
            }
        )
    )
    own_dir = tmp_path_factory.mktemp("own_run")
    own = load_config(
        overrides=tiny_overrides(
            prepared,
            own_dir,
            {
                "tracking.enabled": True,
                "tracking.uri": trained.store,
                "training.lr": 3e-3,
                "training.max_steps": 8,
                "registry.model_name": "tiny-data",
            },
        )
    )
    train(own, console=False)
    name = "tiny-data"
    champion = promote(trained.config("better", name))
    assert champion.alias == "champion"
    decision = promote(own)
    assert decision.value < champion.value, "the other data's loss must look better"
    assert (decision.alias, decision.promoted) == ("challenger", False)
    assert "other validation data (data hash)" in decision.reason
    assert "other tokenizer" in decision.reason
    client = MlflowClient(trained.store)
    assert _aliases(client, name)["champion"] == champion.version

    # An old champion without these tags: nothing to compare with, so it is not replaced.
    for tag in ("data.hash", "tokenizer.sha256", "evaluation.settings"):
        client.delete_model_version_tag(name, champion.version, tag)
    again = promote(own)
    assert again.alias == "challenger" and "the champion records no tokenizer" in again.reason
    forced = promote(own, force=True)
    assert forced.promoted and "not measured alike" in forced.reason
    assert _aliases(client, name)["champion"] == forced.version


def test_champion_alias_loads_and_generates(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "tiny-serve"
    decision = promote(trained.config("better", name))
    assert decision.alias == "champion"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.store)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    texts = model.predict(["ROMEO:", "To be"], params={"max_new_tokens": 12, "seed": 3})
    assert len(texts) == 2 and texts[0].startswith("ROMEO:") and len(texts[1]) > len("To be")
    again = model.predict(["ROMEO:", "To be"], params={"max_new_tokens": 12, "seed": 3})
    assert again == texts, "a seed makes generation repeatable"


def test_a_run_without_tracking_is_a_clear_error(trained: Trained, tmp_path: Path) -> None:
    config = trained.config("base", "nothing", {"output_dir": str(tmp_path / "empty")})
    with pytest.raises(UserError, match="no MLflow run id"):
        promote(config)


@pytest.mark.parametrize(
    ("greater", "new", "old", "expected"),
    [
        (False, 2.0, 3.0, True),
        (False, 3.0, 3.0, False),  # a tie keeps the incumbent
        (False, 4.0, 3.0, False),
        (True, 0.7, 0.6, True),
        (True, None, 0.6, False),  # a missing number never wins
        (False, 2.0, None, False),
    ],
)
def test_decide(greater: bool, new: float | None, old: float | None, expected: bool) -> None:
    registry = RegistryConfig(metric="m", greater_is_better=greater)
    assert decide(registry, new, old, "1", "2", force=False)[0] is expected
    assert decide(registry, new, old, "1", "2", force=True)[0] is True
    assert decide(registry, new, old, None, "2", force=False) == (True, "no champion yet")
