"""Data mixtures: the sampler's order and state, the components that build it, exact resume.

The sampler is checked on synthetic token arrays (fast, exact); training runs use two source
folders cut from the session's prepared Shakespeare, written with the prepared-format models.
"""

from __future__ import annotations

import json
import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import set_args, tiny_overrides

from pipeline.checkpoint.layout import checksum_path
from pipeline.config.loader import load_config
from pipeline.data.prepared import (
    ShardMeta,
    SplitMeta,
    data_hash,
    load_meta,
    open_stream,
    open_tokens,
)
from pipeline.data.token_stream import TokenStream
from pipeline.errors import CheckpointError, DataError
from pipeline.hashing import file_sha256
from pipeline.tracking.run_metadata import run_params, run_tags
from pipeline.training.components import build_components
from pipeline.training.mixture import BLOCK, SOURCE_SHIFT, MixtureSampler, source_seed
from pipeline.training.run import train
from pipeline.training.sampler import SequenceSampler, evaluation_windows
from pipeline.training.trainer import Trainer

SEQ = 16


def _tokens(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 500, count).astype(np.uint16)


def _three() -> MixtureSampler:
    """Weights 6:3:1 (0.6/0.3/0.1) over sources of very different sizes."""
    sources = [
        ("web", 6.0, _tokens(SEQ * 100 + 1, 1)),
        ("books", 3.0, _tokens(SEQ * 30 + 5, 2)),
        ("wiki", 1.0, _tokens(SEQ * 7 + 3, 3)),
    ]
    return MixtureSampler.from_tokens(sources, SEQ, seed=11)


# ------------------------------------------------------------------------------ sampler
def test_one_source_is_todays_sequence_sampler() -> None:
    tokens = _tokens(SEQ * 50 + 1, 0)
    old = SequenceSampler(tokens, SEQ, seed=7)
    new = MixtureSampler.from_tokens([("only", 1.0, tokens)], SEQ, seed=7)
    assert new.num_windows == old.num_windows
    for _ in range(20):  # 140 sequences: almost three epochs of 50
        ids = old.global_batch(7)
        assert np.array_equal(new.global_batch(7), ids)
        for got, want in zip(new.gather(ids), old.gather(ids), strict=True):
            assert torch.equal(got, want)
        assert new.cursor == old.cursor and new.epoch == old.epoch
    state = new.state_dict()
    assert {k: state[k] for k in old.state_dict()} == old.state_dict(), "old code reads it"
    fresh = MixtureSampler.from_tokens([("only", 1.0, tokens)], SEQ, seed=7)
    fresh.load_state_dict(old.state_dict())  # a checkpoint from before mixtures
    assert np.array_equal(fresh.global_batch(5), old.global_batch(5))
    assert new.data_metrics() == {}, "no per-source metrics for one source"


def test_shares_follow_the_weights_and_each_source_is_read_in_order() -> None:
    sampler = _three()
    ids = np.concatenate([sampler.global_batch(1000) for _ in range(20)])
    which = ids >> SOURCE_SHIFT
    shares = np.bincount(which, minlength=3) / len(ids)
    assert shares == pytest.approx([0.6, 0.3, 0.1], abs=0.01)
    counts = sampler.source_counts()
    assert list(counts.values()) == np.bincount(which).tolist()
    for index, source in enumerate(sampler.sources):
        # A source's sequences are its own sampler's stream, in order, epoch after epoch.
        local = ids[which == index] & ((1 << SOURCE_SHIFT) - 1)
        assert np.array_equal(local, source.sampler.window_ids(0, len(local)))
    epochs = sampler.source_epochs()
    assert epochs["wiki"] == counts["wiki"] / 7 and epochs["wiki"] > 200 > epochs["web"]
    assert sampler.source_tokens()["books"] == counts["books"] * SEQ
    assert sampler.epoch == counts["wiki"] // 7, "the most repeated source's passes"
    metrics = sampler.data_metrics()
    assert metrics["data/web/tokens"] == counts["web"] * SEQ
    assert metrics["data/wiki/epochs"] == epochs["wiki"]
    assert len({source.sampler.seed for source in sampler.sources}) == 3
    assert sampler.sources[0].sampler.seed == source_seed(11, "web", 3) != 11


def test_the_cursor_is_the_whole_state_and_any_position_is_addressable() -> None:
    walker = _three()
    batches = {}
    while walker.cursor < BLOCK + 5000:  # across the first block boundary
        start = walker.cursor
        batches[start] = walker.global_batch(997)
    for position in (0, 997 * 30, 997 * 65, 997 * 66):
        fresh = _three()
        fresh.cursor = position  # as nonfinite rollback assigns it
        assert np.array_equal(fresh.global_batch(997), batches[position]), position
    restored = _three()
    restored.load_state_dict(walker.state_dict())
    assert restored.cursor == walker.cursor
    assert np.array_equal(restored.global_batch(64), walker.global_batch(64))
    assert restored.source_counts(997 * 66) == walker.source_counts(997 * 66)
    walker.cursor = 997 * 3  # backwards
    assert np.array_equal(walker.global_batch(997), batches[997 * 3])
    state = json.loads(json.dumps(restored.state_dict()))
    assert state["sources"][2] == {
        "name": "wiki",
        "weight": 1.0,
        "seed": source_seed(11, "wiki", 3),
        "seq_len": SEQ,
        "num_windows": 7,
    }


def test_gather_decodes_ids_in_the_given_order() -> None:
    sampler = _three()
    ids = sampler.global_batch(40)[::-1].copy()
    inputs, targets = sampler.gather(ids)
    for row, global_id in enumerate(ids):
        source = sampler.sources[int(global_id >> SOURCE_SHIFT)].sampler
        start = int(global_id & ((1 << SOURCE_SHIFT) - 1)) * SEQ
        window = torch.from_numpy(source.tokens[start : start + SEQ + 1].astype(np.int64))
        assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])


def test_windows_spanning_shards_are_those_of_one_array() -> None:
    a, b = _tokens(SEQ * 40 + 9, 4), _tokens(SEQ * 25 + 2, 5)
    cuts = [0, 37, 38, 301, SEQ * 20 + 5, len(a)]  # none on a window boundary
    shards = [a[lo:hi] for lo, hi in pairwise(cuts)]
    whole = MixtureSampler.from_tokens([("a", 2.0, a), ("b", 1.0, b)], SEQ, seed=3)
    sharded = MixtureSampler.from_tokens(
        [("a", 2.0, TokenStream(shards)), ("b", 1.0, TokenStream([b[:100], b[100:]]))], SEQ, 3
    )
    ids = whole.global_batch(300)  # several epochs of both
    assert np.array_equal(sharded.global_batch(300), ids)
    for got, want in zip(sharded.gather(ids), whole.gather(ids), strict=True):
        assert torch.equal(got, want)


def test_a_different_mixture_is_refused_naming_the_difference() -> None:
    state = _three().state_dict()
    a, b = _tokens(SEQ * 100 + 1, 1), _tokens(SEQ * 30 + 5, 2)
    c = _tokens(SEQ * 7 + 3, 3)

    def mixture(sources: list, seed: int = 11) -> MixtureSampler:
        return MixtureSampler.from_tokens(sources, SEQ, seed)

    cases = {
        r"data source 'books' differs: checkpoint has weight=3.0, this run has 4.0": mixture(
            [("web", 6.0, a), ("books", 4.0, b), ("wiki", 1.0, c)]
        ),
        r"data source 'wiki' differs: checkpoint has num_windows=7, this run has 8": mixture(
            [("web", 6.0, a), ("books", 3.0, b), ("wiki", 1.0, _tokens(SEQ * 8 + 1, 3))]
        ),
        r"data sources differ: checkpoint has \['web', 'books', 'wiki'\], this run has "
        r"\['web', 'books'\]": mixture([("web", 6.0, a), ("books", 3.0, b)]),
        r"checkpoint has seed=11, this run has 12": mixture(
            [("web", 6.0, a), ("books", 3.0, b), ("wiki", 1.0, c)], seed=12
        ),
    }
    for message, sampler in cases.items():
        with pytest.raises(ValueError, match=message):
            sampler.load_state_dict(state)
    old = SequenceSampler(a, SEQ, 11).state_dict()
    with pytest.raises(ValueError, match="checkpoint has one source, this run mixes"):
        _three().load_state_dict(old)
    with pytest.raises(ValueError, match="checkpoint has num_windows=100, this run has 30"):
        mixture([("web", 1.0, b)]).load_state_dict(old)


# --------------------------------------------------------------------------- components
def _write_source(folder: Path, base: Path, splits: dict[str, list[np.ndarray]]) -> Path:
    """A prepared folder whose splits are the given token shards, with `base`'s tokenizer."""
    meta = load_meta(base)
    folder.mkdir(parents=True)
    tokenizer = meta.tokenizer.file
    shutil.copy(base / tokenizer, folder / tokenizer)
    outputs = {tokenizer: meta.outputs[tokenizer]}
    split_meta = {}
    for split, arrays in splits.items():
        shards = []
        for number, array in enumerate(arrays):
            name = f"{split}_{number:05d}.bin"
            np.asarray(array, dtype="<u2").tofile(folder / name)
            outputs[name] = file_sha256(folder / name)
            shards.append(ShardMeta(file=name, tokens=len(array)))
        split_meta[split] = SplitMeta(
            shards=shards, documents=1, tokens=sum(len(a) for a in arrays), text_bytes=0
        )
    written = meta.model_copy(
        update={
            "format_version": 2,
            "source": folder.name,
            "splits": split_meta,
            "outputs": outputs,
            "data_hash": data_hash(
                meta.dtype, meta.vocab_size, meta.eot_id, meta.tokenizer.kind, outputs
            ),
        }
    )
    (folder / "meta.json").write_text(written.model_dump_json(indent=2))
    return folder


@pytest.fixture(scope="module")
def mixture_dir(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`books` (60% of the train tokens, in 3 shards) and `wiki` (the rest) under one parent."""
    train = np.asarray(open_tokens(prepared_dir, "train"))
    val = np.asarray(open_tokens(prepared_dir, "val"))
    cut, half = int(len(train) * 0.6), len(val) // 2
    root = tmp_path_factory.mktemp("mixture")
    books = train[:cut]
    _write_source(
        root / "books",
        prepared_dir,
        {"train": [books[:1001], books[1001:5000], books[5000:]], "val": [val[:half]]},
    )
    _write_source(root / "wiki", prepared_dir, {"train": [train[cut:]], "val": [val[half:]]})
    return root


def _mixture(weights: dict[str, float]) -> dict[str, object]:
    sources = {
        name: {
            "kind": "files",
            "inputs": [f"corpus/{name}/*.txt"],
            "text_field": "text",
            "weight": weight,
        }
        for name, weight in weights.items()
    }
    return {"data.sources": sources}


WEIGHTS = {"books": 0.7, "wiki": 0.3}


def _config(data: Path, run_dir: Path, extra: dict | None = None):
    return load_config(
        overrides=tiny_overrides(data, run_dir, {**_mixture(WEIGHTS), **(extra or {})})
    )


def test_components_check_the_sources_and_name_the_data(mixture_dir: Path, tmp_path: Path) -> None:
    parts = build_components(_config(mixture_dir, tmp_path / "run"))
    assert parts.sampler.names == ["books", "wiki"] and parts.val_sampler.names == ["books", "wiki"]
    books = load_meta(mixture_dir / "books")
    assert len(open_stream(mixture_dir / "books", "train").shards) == 3
    assert parts.sampler.sources[0].sampler.num_windows == (books.splits["train"].tokens - 1) // 64
    wiki = load_meta(mixture_dir / "wiki")
    assert parts.data_hash not in (books.data_hash, wiki.data_hash)
    assert parts.tokenizer_id == f"bpe:{books.outputs[books.tokenizer.file]}"
    reweighted = build_components(
        _config(mixture_dir, tmp_path / "run", _mixture({"books": 0.6, "wiki": 0.4}))
    )
    assert reweighted.data_hash != parts.data_hash, "weights are part of what the data is"

    other = tmp_path / "other"
    shutil.copytree(mixture_dir, other)
    meta = load_meta(other / "wiki")
    (other / "wiki" / "meta.json").write_text(
        meta.model_copy(update={"eot_id": meta.eot_id + 1}).model_dump_json()
    )
    with pytest.raises(DataError, match=r"books and .*wiki differ in eot_id \(\d+ vs \d+\)"):
        build_components(_config(other, tmp_path / "run"))
    (other / "wiki" / "meta.json").write_text(
        meta.model_copy(
            update={"tokenizer": meta.tokenizer.model_copy(update={"kind": "gpt2"})}
        ).model_dump_json()
    )
    with pytest.raises(DataError, match=r"differ in tokenizer \(bpe:\w+ vs gpt2:\w+\)"):
        build_components(_config(other, tmp_path / "run"))

    short = tmp_path / "short"
    shutil.copytree(mixture_dir / "books", short / "books")
    _write_source(
        short / "wiki", mixture_dir / "books", {"train": [np.arange(64)], "val": [np.arange(99)]}
    )
    with pytest.raises(DataError, match=r"short/wiki: the train split has 64 tokens, fewer than"):
        build_components(_config(short, tmp_path / "run"))


def test_one_source_trains_on_todays_batches(prepared_dir: Path, tmp_path: Path) -> None:
    """The default pipeline's data is unchanged: what the trainer gathers, train and val, is
    exactly what `SequenceSampler` over the old memory map gives, and the data hash is too."""
    config = load_config(overrides=tiny_overrides(prepared_dir, tmp_path / "run"))
    trainer = Trainer(config)
    parts = trainer.parts
    assert parts.data_hash == load_meta(prepared_dir).data_hash
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    gather = parts.sampler.gather

    def recording_gather(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(gather(ids))
        return seen[-1]

    parts.sampler.gather = recording_gather  # type: ignore[method-assign]
    old = SequenceSampler(open_tokens(prepared_dir, "train"), 64, config.seed)
    steps = 6
    want = []
    for _ in range(steps):
        trainer.train_step()
        ids = old.global_batch(8)
        want += [old.gather(ids[:4]), old.gather(ids[4:])]  # micro batches of 4
    assert len(seen) == len(want) == 2 * steps
    for (x, y), (wx, wy) in zip(seen, want, strict=True):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    val = SequenceSampler(open_tokens(prepared_dir, "val"), 64, config.seed)
    windows = evaluation_windows(val.num_windows, 8)
    (source,) = parts.val_sampler.sources
    assert torch.equal(source.sampler.gather(windows)[0], val.gather(windows)[0])
    assert trainer.evaluate() == trainer.evaluate_sources()[config.data.source]
    assert parts.sampler.data_metrics() == {}


def test_a_checkpoint_from_before_mixtures_resumes(prepared_dir: Path, tmp_path: Path) -> None:
    config = load_config(overrides=tiny_overrides(prepared_dir, tmp_path / "run"))
    full = Trainer(config)
    losses = [float(full.train_step()["train/loss"]) for _ in range(6)]
    half = Trainer(config)
    for _ in range(3):
        half.train_step()
    saved = half.save_checkpoint()
    half.strategy.flush_checkpoints()
    state = torch.load(saved, weights_only=True)
    state["sampler"] = {  # the sampler state a checkpoint from before mixtures holds
        k: state["sampler"][k] for k in ("cursor", "seed", "seq_len", "num_windows")
    }
    old = tmp_path / "old.pt"
    torch.save(state, old)
    checksum_path(old).write_text(f"{file_sha256(old)}  {old.name}\n")
    resumed = Trainer(config)
    resumed.resume(old)
    rest = [float(resumed.train_step()["train/loss"]) for _ in range(3)]
    assert [x.hex() for x in rest] == [x.hex() for x in losses[3:]]


# ------------------------------------------------------------------------- training runs
def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "latest_checkpoint.pt", weights_only=True)["model"]


def test_resume_through_a_mixture_is_bitwise_exact(mixture_dir: Path, tmp_path: Path) -> None:
    extra = {"model.dropout": 0.1}
    full = train(_config(mixture_dir, tmp_path / "full", extra), console=False)
    half = train(
        _config(mixture_dir, tmp_path / "split", {**extra, "training.max_steps": 4}), console=False
    )
    rest = train(_config(mixture_dir, tmp_path / "split", extra), resume="latest", console=False)
    resumed = {**half.losses, **rest.losses}
    assert sorted(full.losses) == list(range(1, 9))
    assert {s: v.hex() for s, v in resumed.items()} == {s: v.hex() for s, v in full.losses.items()}
    assert rest.val_losses == {s: v for s, v in full.val_losses.items() if s > 4}
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    state = torch.load(tmp_path / "full/checkpoints/latest_checkpoint.pt", weights_only=True)
    sampler = state["sampler"]
    assert sampler["cursor"] == 64 and [s["name"] for s in sampler["sources"]] == ["books", "wiki"]
    metrics = json.loads((tmp_path / "full" / "metrics" / "train.json").read_text())
    assert metrics["data_books_tokens"] + metrics["data_wiki_tokens"] == 64 * 64
    assert metrics["data_wiki_epochs"] > 0 and "val_books_loss" in metrics
    books, wiki = metrics["val_books_loss"], metrics["val_wiki_loss"]
    assert metrics["val_loss"] == pytest.approx(0.7 * books + 0.3 * wiki, rel=1e-6)
    log = (tmp_path / "full" / "logs" / "training.log").read_text()
    assert f"step 8: val loss {metrics['val_loss']:.4f} (books {books:.4f}, wiki {wiki:.4f})" in log

    with pytest.raises(CheckpointError, match="data source 'books' differs: checkpoint has weight"):
        train(
            _config(mixture_dir, tmp_path / "split", _mixture({"books": 0.5, "wiki": 0.3})),
            resume=str(tmp_path / "split" / "checkpoints" / "step_0000004.pt"),
            console=False,
        )


@pytest.mark.slow
def test_ddp_on_a_mixture_sees_the_single_process_batches(
    mixture_dir: Path, tmp_path: Path
) -> None:
    """2 ranks (gloo) slice the same global batches: the loss curve is the one-process one."""
    from test_distributed import assert_close_curves, curve, run_stage

    overrides = {**_mixture(WEIGHTS), "training.max_steps": 4, "training.eval_interval": 4}
    single = tmp_path / "single"
    train(load_config(overrides=tiny_overrides(mixture_dir, single, overrides)), console=False)
    ddp = tmp_path / "ddp"
    args = ["--gpus_per_node", "2", "--distributed_backend", "gloo"]
    proc = run_stage([*args, *set_args(tiny_overrides(mixture_dir, ddp, overrides))], tmp_path)
    assert proc.returncode == 0, proc.stdout
    assert_close_curves(curve(ddp), curve(single), rel=1e-5)
    state = torch.load(ddp / "checkpoints" / "latest_checkpoint.pt", weights_only=True)
    assert state["sampler"]["cursor"] == 4 * 8


def test_mlflow_params_and_tags_name_the_sources(prepared_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path / "data", tmp_path / "run")
    params = run_params(config)
    assert params["data.sources.books.weight"] == "0.7"
    assert params["data.sources.wiki.weight"] == "0.3"
    tags = run_tags(config, "abc", 1, "single")
    assert tags["data.mixture"] == "books:0.7,wiki:0.3" and tags["data.hash"] == "abc"
    single = load_config(overrides=tiny_overrides(prepared_dir, tmp_path / "one"))
    assert "data.mixture" not in run_tags(single, None, 1, "single")
    assert not any(key.startswith("data.sources.") for key in run_params(single))
