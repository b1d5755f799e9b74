"""`data.sources`: a mixture's names, required keys and tokenizer sources are checked up front,
each problem naming the key and the file, before anything is read or written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config.loader import load_config
from pipeline.data.sources import data_sources, find_source, primary_folder, tokenizer_folder
from pipeline.errors import ConfigError

WEB = {"kind": "files", "inputs": ["web/*.jsonl.gz"], "text_field": "text", "weight": 0.6}
BOOKS = {"kind": "files", "inputs": ["books/*.parquet"], "text_field": "body"}


def _load(tmp_path: Path, data: dict[str, object]) -> object:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": data}, sort_keys=False))
    return load_config(params_file=params)


def test_a_mixture_resolves_to_one_folder_per_source(tmp_path: Path) -> None:
    config = _load(tmp_path, {"sources": {"web": WEB, "books": BOOKS}})
    sources = data_sources(config.data)
    assert [(s.name, s.weight, str(s.folder)) for s in sources] == [
        ("web", 0.6, "data/prepared/web"),
        ("books", 1.0, "data/prepared/books"),
    ]
    assert str(primary_folder(config.data)) == "data/prepared/web"
    assert str(tokenizer_folder(config.data)) == "data/tokenizer"
    assert find_source(config.data, "books").text_field == "body"
    with pytest.raises(ConfigError, match=r"no source 'wiki' in data.sources; known: web, books"):
        find_source(config.data, "wiki")


def test_one_source_keeps_the_prepared_folder_itself(tmp_path: Path) -> None:
    config = _load(tmp_path, {"source": "files", "inputs": ["a/*.txt"], "prepared_dir": "p"})
    (source,) = data_sources(config.data)
    assert (source.name, str(source.folder), str(tokenizer_folder(config.data))) == (
        "files",
        "p",
        "p",
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sources": {"web": {**WEB, "kind": None}}}, "data.sources.web.kind"),
        ({"sources": {"web": {k: v for k, v in WEB.items() if k != "text_field"}}},
         "data.sources.web.text_field: Field required"),
        ({"sources": {"web": {**WEB, "inputs": []}}}, "kind 'files' needs inputs"),
        ({"sources": {"web": {**WEB, "weight": 0}}}, "data.sources.web.weight"),
        ({"sources": {"../up": WEB}}, "source names must match"),
        ({"sources": {"web": WEB}, "inputs": ["x.txt"], "source": "files"},
         "give either data.sources"),
        ({"sources": {"web": WEB}, "tokenizer_sources": ["wiki"]}, "data.tokenizer_sources"),
        ({"sources": {"web": WEB}, "tokenizer_sources": []}, "an empty list"),
    ],
)  # fmt: skip
def test_bad_sources_are_one_config_error_naming_the_key(
    tmp_path: Path, data: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, data)
    assert message in str(caught.value) and "\n" not in str(caught.value), caught.value
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_an_empty_mapping_clears_the_sources_but_sections_still_merge(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"sources": {"web": WEB}}, "model": {}}))
    config = load_config(
        params_file=params,
        overrides={"data.sources": {}, "data.source": "files", "data.inputs": ["a.txt"]},
    )
    assert config.data.sources == {} and config.data.inputs == ["a.txt"]
