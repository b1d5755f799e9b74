"""Generation and Hugging Face export, and the `evaluate` / `generate` / `export` commands.

The HF checks load the exported folder with transformers itself: logits equal the project's
within 1e-4, and `AutoTokenizer` gives the project's ids, for both tokenizer kinds (GPT-2's
real BPE file is not on this machine, so the `gpt2` kind is checked with a small .tiktoken
file trained here; the real r50k_base is checked too when tiktoken's cache has it).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import REPO_ROOT
from eval_support import (
    FIXTURES,
    mlflow_env,  # noqa: F401  (a fixture, used by name)
    tiny_run,
)

from pipeline.cli import cli, run_command
from pipeline.data.tokenizer import (
    R50K_SHA256,
    R50K_URL,
    TiktokenTokenizer,
    gpt2_style_encoding,
    parse_tiktoken_ranks,
)
from pipeline.evaluation.model_source import LoadedModel, load_model
from pipeline.evaluation.tracking_hook import log_to_tracking
from pipeline.export import export_model
from pipeline.export.hf_tokenizer import tiktoken_to_vocab_merges
from pipeline.model import GPT

TEXTS = [
    "ROMEO: But soft, what light through yonder window breaks?",
    "  Leading spaces,\ttabs,\n\nnew lines and trailing space ",
    "Ünïcödé, emoji 🙂 and numbers 1234567 — 'quotes' don't matter.",
]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, prepared_dir):
    return tiny_run(tmp_path_factory, prepared_dir)


def _invoke(args: list[str], **kwargs) -> str:
    result = CliRunner().invoke(cli, args, catch_exceptions=False, **kwargs)
    assert result.exit_code == 0, result.output
    return result.stdout


def _generate_args(source: str, *extra: str) -> list[str]:
    return [
        "generate",
        "--model_checkpoint",
        source,
        "--prompt",
        "ROMEO:",
        "--max_length",
        "24",
        "--device",
        "cpu",
        *extra,
    ]


def test_generate_is_seeded_and_the_cache_changes_nothing(run_config) -> None:
    model_dir = str(Path(run_config.run_dir) / "model")
    sampled = _generate_args(model_dir, "--temperature", "0.7", "--top_p", "0.8", "--seed", "3")
    first = _invoke(sampled)
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:\n")
    assert _invoke(sampled) == first
    greedy = _generate_args(model_dir, "--temperature", "0")
    cached = _invoke(greedy)
    assert _invoke([*greedy, "--no_cache"]) == cached
    checkpoint = str(Path(run_config.run_dir) / "checkpoints" / "latest_checkpoint.pt")
    assert _invoke(_generate_args(checkpoint, "--temperature", "0")) == cached


def test_usage_guide_infer_command_and_its_user_errors(run_config, tmp_path, capsys) -> None:
    checkpoint = str(Path(run_config.run_dir) / "checkpoints" / "latest_checkpoint.pt")
    matching = tmp_path / "model.yaml"
    matching.write_text(yaml.safe_dump({"model": run_config.model.model_dump(mode="json")}))
    done = subprocess.run(
        [
            sys.executable,
            "stages/infer.py",
            "--model_checkpoint",
            checkpoint,
            "--config",
            str(matching),
            "--prompt",
            "Once upon a time",
            "--max_length",
            "10",
            "--temperature",
            "0.7",
            "--top_p",
            "0.8",
            "--seed",
            "1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Once upon a time")

    wrong = [
        "generate",
        "--model_checkpoint",
        checkpoint,
        "--config",
        str(REPO_ROOT / "configs/model_configs/tiny.yaml"),
        "--prompt",
        "x",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_command(cli, wrong)
    assert exit_info.value.code == 2
    assert "does not describe the model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        run_command(cli, ["generate", "--model_checkpoint", str(tmp_path), "--prompt", "x"])
    assert exit_info.value.code == 2


def test_evaluate_command_with_params_and_without(run_config, tmp_path, monkeypatch) -> None:
    run_dir = Path(run_config.run_dir)
    mc = f"multiple_choice:{FIXTURES / 'multiple_choice.jsonl'}"
    out = _invoke(
        [
            "evaluate",
            "--params",
            str(run_dir / "resolved_config.yaml"),
            "--benchmark",
            mc,
            "--max_tokens",
            "256",
        ]
    )
    assert "val_bits_per_byte" in out and "multiple_choice_acc" in out
    saved = json.loads((run_dir / "metrics" / "eval.json").read_text())
    assert saved["val_tokens"] == 256 and saved["multiple_choice_examples"] == 4

    monkeypatch.chdir(tmp_path)  # no params.yaml: the run's own config is used
    _invoke(
        [
            "evaluate",
            "--model_checkpoint",
            str(run_dir / "checkpoints"),
            "--max_tokens",
            "128",
            "--benchmark_limit",
            "2",
            "--benchmark",
            f"lambada:{FIXTURES / 'lambada.jsonl'}",
        ]
    )
    # Not the run's own stage: beside the checkpoints folder, the run's metrics untouched.
    (beside,) = run_dir.glob("step_*-eval")
    saved = json.loads((beside / "eval.json").read_text())
    assert saved["val_tokens"] == 128 and saved["lambada_examples"] == 2
    assert json.loads((run_dir / "metrics" / "eval.json").read_text())["val_tokens"] == 256


def _assert_hf_matches(folder: Path, loaded: LoadedModel) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf, info = GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    model = loaded.model.eval()
    assert hf.config.vocab_size == model.vocab_size
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.vocab_size, (2, model.config.n_ctx), generator=generator)
    with torch.no_grad():
        expected, _ = model(idx)
        got = hf(idx).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == loaded.tokenizer.eot_id
    for text in TEXTS:
        ids = loaded.tokenizer.encode(text)
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == text


def test_hf_export_of_the_trained_bpe_run(run_config, tmp_path) -> None:
    run_dir = Path(run_config.run_dir)
    out = tmp_path / "hf"
    message = _invoke(
        [
            "export",
            "--format",
            "hf",
            "--model_checkpoint",
            str(run_dir / "model"),
            "--output",
            str(out),
        ]
    )
    assert "exported" in message
    config = json.loads((out / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["tie_word_embeddings"]
    _assert_hf_matches(out, load_model(run_dir / "model"))

    # From the checkpoint the same weights come out; a second export needs --force.
    from_ckpt = tmp_path / "hf-ckpt"
    checkpoint = run_dir / "checkpoints" / "latest_checkpoint.pt"
    _invoke(["export", "--model_checkpoint", str(checkpoint), "--output", str(from_ckpt)])
    weights = "model.safetensors"
    assert (from_ckpt / weights).read_bytes() == (out / weights).read_bytes()
    result = CliRunner().invoke(
        cli, ["export", "--model_checkpoint", str(run_dir / "model"), "--output", str(out)]
    )
    assert result.exit_code != 0 and "not empty" in str(result.exception)


def _small_tiktoken(path: Path, corpus: str, n_vocab: int = 300) -> dict[bytes, int]:
    from tiktoken._educational import bpe_train
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = bpe_train(corpus, n_vocab, r50k_pat_str, visualise=None)
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ordered))
    return ranks


def test_hf_export_with_a_tiktoken_gpt2_style_tokenizer(run_config, small_corpus_dir, tmp_path):
    corpus = "".join(p.read_text() for p in sorted(small_corpus_dir.glob("*.txt")))
    file = tmp_path / "small.tiktoken"
    _small_tiktoken(file, corpus[:20_000])
    encoding = gpt2_style_encoding("small", parse_tiktoken_ranks(file.read_bytes(), str(file)))
    tokenizer = TiktokenTokenizer(encoding, file)
    torch.manual_seed(0)
    model = GPT(run_config.model.model_copy(update={"vocab_size": None}), tokenizer.vocab_size)
    assert model.padded_vocab_size > model.vocab_size == 301  # the export drops the padding
    loaded = LoadedModel(model, run_config, tokenizer, str(file), None)
    out = export_model(loaded, "hf", tmp_path / "hf")
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    _assert_hf_matches(out, loaded)

    # GPT-2's own files alone (vocab.json + merges.txt, no tokenizer.json) give the same ids.
    from transformers import GPT2Tokenizer

    gpt2_files = tmp_path / "gpt2-files"
    gpt2_files.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (gpt2_files / name).write_bytes((out / name).read_bytes())
    from_files = GPT2Tokenizer.from_pretrained(gpt2_files)
    sample = corpus[20_000:30_000]
    expected = tokenizer.encode(sample)
    assert len(expected) > 1000 and from_files.encode(sample) == expected


def _cached_r50k() -> Path | None:
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folder = Path(cache or Path(tempfile.gettempdir()) / "data-gym-cache")
    path = folder / hashlib.sha1(R50K_URL.encode()).hexdigest()
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == R50K_SHA256:
        return path
    return None


@pytest.mark.skipif(_cached_r50k() is None, reason="GPT-2's r50k_base is not in tiktoken's cache")
def test_r50k_converts_to_gpt2_vocab_and_merges() -> None:
    import tokenizers

    path = _cached_r50k()
    assert path is not None
    vocab, merges = tiktoken_to_vocab_merges(parse_tiktoken_ranks(path.read_bytes(), str(path)))
    assert len(vocab) == 50256 and len(merges) == 50000
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    encoding = gpt2_style_encoding("r50k", parse_tiktoken_ranks(path.read_bytes(), str(path)))
    for text in TEXTS:
        assert hf.encode(text).ids == encoding.encode_ordinary(text)


@pytest.mark.usefixtures("mlflow_env")
def test_models_come_from_mlflow_uris_and_metrics_go_to_the_run(run_config, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("eval", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    model_dir = Path(run_config.run_dir) / "model"
    client.log_artifacts(run_id, str(model_dir), "model")

    remote = load_model(f"runs:/{run_id}/model", tracking_uri=uri, download_dir=tmp_path / "dl")
    local = load_model(model_dir)
    for key, value in local.model.state_dict().items():
        assert torch.equal(remote.model.state_dict()[key], value), key
    greedy = _generate_args(f"runs:/{run_id}/model", "--temperature", "0")
    env = {"MLFLOW_TRACKING_URI": uri}
    assert _invoke(greedy, env=env) == _invoke(_generate_args(str(model_dir), "--temperature", "0"))

    config = run_config.model_copy(deep=True)
    config.tracking.enabled = True
    config.tracking.uri = uri
    assert log_to_tracking({"val_loss": 2.5, "lambada_acc": 0.25}, config, run_id)
    assert client.get_run(run_id).data.metrics == {"val_loss": 2.5, "lambada_acc": 0.25}
