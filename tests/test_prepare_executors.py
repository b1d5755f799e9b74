"""Who runs prepare's tasks never changes its bytes: DataTrove's local executor against the
process pool, a bad input under DataTrove, and the GPT-3 mixture example config.

The SLURM executor (`datatrove_slurm`) runs the same comparison through a real one-node
cluster in `tests/test_slurm.py`, with `write_corpus`/`write_params` from here.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import run_command
from pipeline.cli.prepare import prepare
from pipeline.config.loader import load_config
from pipeline.config.schema import DataConfig
from pipeline.data.sources import data_sources
from pipeline.errors import USER_ERROR_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[1]
MIXTURE_EXAMPLE = REPO_ROOT / "configs" / "data_configs" / "gpt3_mixture.yaml"


def write_corpus(folder: Path, documents: int = 400, seed: int = 0) -> list[str]:
    """Three .jsonl.gz files of `documents` documents and a Parquet file of 3x as many in
    four row groups: made-up words, seeded. Returns the input globs, in order."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(2000)]

    def document() -> str:
        return " ".join(rng.choices(words, k=rng.randint(20, 400))) + "."

    folder.mkdir(parents=True, exist_ok=True)
    for part in range(3):
        with gzip.open(folder / f"part{part}.jsonl.gz", "wt", encoding="utf-8") as handle:
            for number in range(documents):
                handle.write(json.dumps({"id": f"{part}-{number}", "text": document()}) + "\n")
    table = pa.table({"text": [document() for _ in range(3 * documents)]})
    pq.write_table(table, folder / "more.parquet", row_group_size=3 * documents // 4)
    return [str(folder / "*.jsonl.gz"), str(folder / "*.parquet")]


def task_bytes_for(folder: Path) -> int:
    """About 5 tasks: two gz files, the last one with a row group, then a row group each."""
    return (folder / "part0.jsonl.gz").stat().st_size * 6 // 5


def write_params(
    path: Path, inputs: list[str], root: Path, task_bytes: int, **data: object
) -> Path:
    """A params file of one `files` source prepared into `root/prepared`, scratch in `root/work`."""
    values = {
        "source": "files",
        "inputs": inputs,
        "vocab_size": 512,
        "val_fraction": 0.1,
        "task_bytes": task_bytes,
        "num_workers": 1,
        "executor": "local",
        "work_dir": str(root / "work"),
        "prepared_dir": str(root / "prepared"),
        **data,
    }
    path.write_text(yaml.safe_dump({"seed": 7, "data": values}), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a prepared folder (shards, tokenizer, meta.json) by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run_prepare(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`gpt3 prepare ARGS` as the console script runs it: (exit code, out, err)."""
    with pytest.raises(SystemExit) as exited:
        run_command(prepare, args)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], int]:
    folder = tmp_path_factory.mktemp("corpus")
    return write_corpus(folder, documents=120), task_bytes_for(folder)


def test_datatrove_executor_gives_the_local_bytes_whatever_the_workers(
    corpus: tuple[list[str], int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, task_bytes = corpus
    outputs: dict[str, dict[str, bytes]] = {}
    for executor in ("local", "datatrove"):
        for workers in (1, 2):
            name = f"{executor}-{workers}"
            root = tmp_path / name
            params = write_params(
                tmp_path / f"{name}.yaml",
                inputs,
                root,
                task_bytes,
                executor=executor,
                num_workers=workers,
            )
            code, out, err = run_prepare(["--params", str(params), "--no-progress"], capsys)
            assert code == 0, err
            assert "prepared files: " in out, out
            outputs[name] = snapshot(root / "prepared")
            assert not (root / "work").exists(), "the scratch folder is removed at the end"
    reference = outputs.pop("local-1")
    meta = json.loads(reference["meta.json"])
    assert len(meta["splits"]["train"]["shards"]) == 5, "the corpus makes 5 tasks"
    assert len(meta["inputs"]) == 4
    for name, files in outputs.items():
        assert sorted(files) == sorted(reference), name
        for file, data in files.items():
            assert data == reference[file], f"{name}: {file} differs"


def test_bad_input_under_datatrove_is_one_line_naming_the_file(
    corpus: tuple[list[str], int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs, task_bytes = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n', encoding="utf-8")
    for workers in (1, 2):
        root = tmp_path / f"run-{workers}"
        params = write_params(
            tmp_path / f"bad-{workers}.yaml",
            [*inputs, str(bad)],
            root,
            task_bytes,
            executor="datatrove",
            num_workers=workers,
        )
        code, out, err = run_prepare(["--params", str(params), "--no-progress"], capsys)
        assert code == USER_ERROR_EXIT_CODE, (workers, out, err)
        # DataTrove logs each task (and the failed task's traceback) on stderr before it;
        # the CLI's own message is the last line, and the only one.
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert errors == [err.splitlines()[-1]], (workers, err[-2000:])
        assert errors[0].startswith(f"error: {bad}:2: not valid JSON"), (workers, errors)
        assert not (root / "prepared").exists()


def test_the_gpt3_mixture_example_is_a_valid_data_section() -> None:
    values = yaml.safe_load(MIXTURE_EXAMPLE.read_text(encoding="utf-8"))
    data = DataConfig.model_validate(values["data"])
    assert data.tokenizer == "gpt2"
    weights = {name: source.weight for name, source in data.sources.items()}
    assert weights == {
        "common_crawl": 60.0,
        "webtext2": 22.0,
        "books1": 8.0,
        "books2": 8.0,
        "wikipedia": 3.0,
    }
    for name, source in data.sources.items():
        assert source.kind == "files"
        assert source.inputs and all(i.startswith(f"data/raw/{name}/") for i in source.inputs)
    # The command the file's comments give: `gpt3 prepare --params <this file>`.
    config = load_config(params_file=MIXTURE_EXAMPLE)
    assert [spec.name for spec in data_sources(config.data)] == list(weights)
