"""Model metadata: validated at registration with messages naming the field, stored and returned
as given, published as JSON Schema; an earlier registry file gains the new columns."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelmora.config import ModelSettings
from modelmora.errors import InvalidInput
from modelmora.registry import (
    ModelMetadata,
    SQLiteStore,
    effective_settings,
    install,
    parse_metadata,
)
from modelmora.registry.schemas import json_schemas
from modelmora.registry.sqlite import SCHEMA_VERSION

SCHEMA_DIR = Path(__file__).parents[2] / "schema"

FULL = {
    "display_name": "MiniLM L6 v2",
    "description": "Sentence embeddings, 384 dimensions.",
    "source_url": "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
    "resources": {"memory_mb": 512, "gpu_vram_mb": 300.5, "cpu_threads": 2},
    "config": {"vector_size": 384, "max_length": 256, "batch_size": 16, "device": "cpu"},
    "params": {"pooling": "mean", "nested": {"a": [1, 2, None]}},
}


def test_full_metadata_round_trips() -> None:
    meta = parse_metadata(FULL, "txt2embed")
    assert msgspec.to_builtins(meta) == FULL
    assert parse_metadata(None) == ModelMetadata()


@pytest.mark.parametrize(
    ("data", "task", "field", "words"),
    [
        ({"resources": {"memory_mb": -5}}, None, "$.metadata.resources.memory_mb", "> 0"),
        ({"resources": {"cpu_threads": 0}}, None, "$.metadata.resources.cpu_threads", ">= 1"),
        ({"resources": {"cpu_threads": "two"}}, None, "$.metadata.resources.cpu_threads", "`int | null`, got `str`"),
        ({"config": {"device": "gpu"}}, None, "$.metadata.config.device", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"config": {"batch_size": 5000}}, None, "$.metadata.config.batch_size", "<= 4096"),
        ({"source_url": "ftp://example.com/m"}, None, "$.metadata.source_url", "https:// or s3:// URL"),
        ({"display_name": "two\nlines"}, None, "$.metadata.display_name", "one line of text"),
        ({"description": "x" * 10_001}, None, "$.metadata.description", "length <= 10000"),
        ({"colour": "red"}, None, "$.metadata.colour", "unknown field"),
        ({"config": {"vectors": 3}}, None, "$.metadata.config.vectors", "unknown field"),
        ({"params": {"": 1}}, None, "$.metadata.params", "length >= 1"),
        ({"params": {"blob": "x" * 70_000}}, None, "$.metadata.params", "more than 65536"),
        ({"config": {"vector_size": 384}}, "txt2txt", "$.metadata.config.vector_size", "embedding models"),
        ({"config": {"max_length": 77}}, "img2embed", "$.metadata.config.max_length", "text input"),
        ([1, 2], None, "$.metadata", "expected `object`"),
    ],
)
def test_bad_metadata_names_the_field(data: Any, task: str | None, field: str, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_metadata(data, task)
    assert info.value.field == field
    assert info.value.message.startswith(field.removeprefix("$.") + ":"), info.value.message
    assert words in info.value.message


def test_effective_settings_take_the_config_where_settings_are_unset() -> None:
    meta = parse_metadata({"config": {"batch_size": 8, "device": "cpu"}})
    assert effective_settings({}, meta) == ModelSettings(max_batch_size=8, device="cpu")
    assert effective_settings({"max_batch_size": 2}, meta) == ModelSettings(max_batch_size=2, device="cpu")
    assert effective_settings({"pinned": True}, ModelMetadata()) == ModelSettings(pinned=True)


def test_install_records_metadata_and_timestamps(tmp_path: Path, echo_dir: Path) -> None:
    home = tmp_path / "home"
    store = SQLiteStore(home / "registry.sqlite3")
    rec = install(store, home, str(echo_dir), model_id="m", task="txt2embed", metadata=FULL)
    assert msgspec.to_builtins(rec.metadata) == FULL
    assert rec.created_at == rec.updated_at > 0
    assert store.get("m") == rec  # what was written is what is read

    # a local source has no URL; a new version without metadata keeps the model's
    plain = install(store, home, str(echo_dir), model_id="plain", task="txt2embed")
    assert plain.metadata == ModelMetadata()
    again = install(store, home, str(echo_dir), model_id="m", version="1.1.0")
    assert again.metadata == rec.metadata and again.updated_at >= rec.updated_at
    assert again.created_at == rec.created_at

    changed = store.update_metadata("m", ModelMetadata(display_name="renamed"))
    assert changed is not None and changed.metadata.display_name == "renamed"
    assert store.update_metadata("nope", ModelMetadata()) is None
    store.close()


def test_install_refuses_bad_metadata_before_copying(tmp_path: Path, echo_dir: Path) -> None:
    home = tmp_path / "home"
    store = SQLiteStore(home / "registry.sqlite3")
    with pytest.raises(InvalidInput) as info:
        install(store, home, str(echo_dir), model_id="m", task="txt2txt", metadata={"config": {"vector_size": 3}})
    assert info.value.field == "$.metadata.config.vector_size"
    with pytest.raises(InvalidInput) as info:  # the task detected from the files (txt2img) decides too
        install(store, home, str(echo_dir), model_id="m", metadata={"config": {"vector_size": 3}})
    assert "not txt2img" in info.value.message
    assert store.list() == []
    assert not (home / "models").exists() or not any((home / "models").iterdir())
    store.close()


def test_an_earlier_registry_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE models (id TEXT PRIMARY KEY, task TEXT NOT NULL, source TEXT NOT NULL,
            active_version TEXT NOT NULL, settings TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
        CREATE TABLE versions (model_id TEXT NOT NULL REFERENCES models(id) ON DELETE CASCADE,
            version TEXT NOT NULL, path TEXT NOT NULL, revision TEXT NOT NULL DEFAULT '',
            files TEXT NOT NULL DEFAULT '{}', size_bytes INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL,
            PRIMARY KEY (model_id, version));
        INSERT INTO models VALUES ('old', 'txt2embed', 'file:///x', '1.0.0', '{"pinned": true}', 100.0);
        INSERT INTO versions VALUES ('old', '1.0.0', '/x', '', '{"a": "00"}', 2, 100.0);
        """
    )
    db.commit()
    db.close()
    store = SQLiteStore(path)
    rec = store.get("old")
    assert rec is not None
    assert rec.metadata == ModelMetadata() and rec.updated_at == rec.created_at == 100.0
    assert rec.settings == {"pinned": True} and rec.versions[0].files == {"a": "00"}
    assert not rec.active_pinned
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    SQLiteStore(path).close()  # opening a current file again changes nothing


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_committed_json_schema_is_current(name: str) -> None:
    """schema/*.schema.json are generated from the msgspec Structs: `uv run just schema` rewrites them."""
    committed = json.loads((SCHEMA_DIR / name).read_text())
    assert committed == json.loads(json.dumps(json_schemas()[name])), "run `uv run just schema` and commit"


def test_the_metadata_schema_describes_the_struct() -> None:
    schema = json_schemas()["model-metadata.schema.json"]
    props = schema["$defs"]["ModelMetadata"]["properties"]
    assert set(props) == set(ModelMetadata.__struct_fields__)
    assert schema["$defs"]["ResourceHints"]["properties"]["memory_mb"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert schema["$defs"]["ModelMetadata"]["additionalProperties"] is False
