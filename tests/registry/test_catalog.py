"""The model catalog: the shipped one is valid and found by repo or id; `mm install ORG/NAME` (or
its id) of a known model needs no flags; a user catalog file adds and overrides entries; a bad one
is one line naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import home, run_cli

from modelmora.config import ConfigError, ModelSettings
from modelmora.registry import SQLiteStore, load_catalog
from modelmora.tasks import TaskType

from fakehub import FakeHub
from serverproc import mm

__all__ = ("home",)


def test_the_shipped_catalog() -> None:
    catalog = load_catalog()
    assert len(catalog.entries) >= 12
    assert {e.task for e in catalog.entries} == set(TaskType)  # every task type has known models
    minilm = catalog.find("sentence-transformers/all-MiniLM-L6-v2")
    assert minilm is not None and minilm.task == TaskType.TXT2EMBED
    assert minilm.metadata.config.vector_size == 384 and minilm.metadata.config.max_length == 256
    assert catalog.find("Sentence-Transformers/ALL-MiniLM-L6-v2@abc") is minilm  # any case, a revision ignored
    assert catalog.find("all-minilm-l6-v2") is minilm and minilm.model_id == "all-MiniLM-L6-v2"
    assert catalog.find("acme/unknown") is None and catalog.find("unknown") is None
    ids = [e.model_id.lower() for e in catalog.entries]
    assert len(ids) == len(set(ids))
    for e in catalog.entries:
        if e.task in (TaskType.TXT2EMBED, TaskType.IMG2EMBED):
            assert e.metadata.config.vector_size, e.source  # every embedding model says its dimension


def test_a_user_catalog_adds_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(
        '[[models]]\nsource = "acme/tiny"\ntask = "txt2embed"\nid = "tiny"\n'
        '[models.metadata]\ndisplay_name = "Tiny"\nconfig = { vector_size = 4 }\n'
        "[models.settings]\nmax_batch_size = 2\n"
        '[[models]]\nsource = "sentence-transformers/all-MiniLM-L6-v2"\ntask = "txt2embed"\nrevision = "main"\n'
    )
    catalog = load_catalog(path)
    tiny = catalog.find("tiny")
    assert tiny is not None and tiny.settings == ModelSettings(max_batch_size=2) and catalog.find("acme/tiny") is tiny
    minilm = catalog.find("all-MiniLM-L6-v2")
    assert minilm is not None and minilm.revision == "main" and minilm.metadata.config.vector_size is None


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("models = [", "is not valid TOML"),
        ('[[models]]\nsource = "acme/x"\ntask = "txt2vec"', "models[0].task: invalid enum value 'txt2vec'"),
        ('[[models]]\nsource = "not a repo"\ntask = "txt2embed"', "models[0].source: expected `str` matching"),
        ('[[models]]\nsource = "acme/x"\ntask = "txt2embed"\ncolour = 1', "models[0].colour: unknown field"),
        ('[[models]]\nsource = "acme/x"\ntask = "txt2txt"\nmetadata = { config = { vector_size = 3 } }',
         "models[0].metadata.config.vector_size: applies to embedding models"),
        ('[[models]]\nsource = "a/x"\ntask = "txt2embed"\n[[models]]\nsource = "b/x"\ntask = "txt2embed"',
         "the id 'x' is given to both a/x and b/x"),
    ],
)  # fmt: skip
def test_a_bad_user_catalog_names_the_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_catalog(path)
    assert needle in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ConfigError, match="cannot read the catalog file"):
        load_catalog(tmp_path / "missing.toml")


def test_a_bad_catalog_file_is_one_line_in_mm(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "c.toml").write_text("models = [\n")
    monkeypatch.setenv("MODELMORA_CATALOG_FILE", str(tmp_path / "c.toml"))
    for args in (["catalog"], ["install", "acme/x"]):
        code, _, err = run_cli(capsys, monkeypatch, *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "is not valid TOML" in err, err
    monkeypatch.delenv("MODELMORA_CATALOG_FILE")
    code, out, _ = run_cli(capsys, monkeypatch, "catalog", "--json", "--task", "img2embed")
    assert code == 0 and {m["id"] for m in json.loads(out)} >= {"clip-vit-base-patch32"}
    code, _, err = run_cli(capsys, monkeypatch, "install", "no-such-model")
    assert code == 1 and "nor a catalog id" in err


def test_installing_known_models_needs_no_flags(tmp_path: Path, minilm_path: Path) -> None:
    """`mm install all-MiniLM-L6-v2` (a catalog id) and a user catalog's model, through a local hub."""
    home, tiny = tmp_path / "home", tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "config.json").write_text('{"architectures": ["BertModel"]}')
    (tiny / "model.safetensors").write_bytes(b"\0" * 64)
    (tiny / "vocab.txt").write_text("[PAD]\n")
    (tiny / "chat_template.jinja").write_text("{{ messages }}")  # newer repos keep the template only here
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        '[[models]]\nsource = "acme/tiny-model"\ntask = "txt2embed"\nid = "tiny"\n'
        '[models.metadata]\ndisplay_name = "Tiny"\ndescription = "from the catalog"\nconfig = { vector_size = 4 }\n'
        "[models.settings]\nmax_batch_size = 2\n"
    )
    with FakeHub() as hub:
        hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_path)
        hub.add_repo("acme/tiny-model", tiny)
        env = {**hub.subprocess_env(tmp_path / "hf"), "MODELMORA_CATALOG_FILE": str(catalog)}
        env.pop("MODELMORA_HOME", None)
        proc = mm("install", "all-MiniLM-L6-v2", home=home, env=env)
        assert "installed all-MiniLM-L6-v2 1.0.0 (txt2embed" in proc.stdout
        mm("install", "acme/tiny-model", "--name", "Tiny, renamed", home=home, env=env)
        proc = mm("install", "tiny@2.0.0", home=home, env=env)  # a catalog id at a version
        assert "installed tiny 2.0.0 (txt2embed" in proc.stdout and "active version stays 1.0.0" in proc.stdout
    store = SQLiteStore(home / "registry.sqlite3")
    minilm = store.get("all-MiniLM-L6-v2")
    assert minilm is not None and minilm.source == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.metadata.config.vector_size == 384 and minilm.metadata.display_name == "all-MiniLM-L6-v2"
    assert minilm.metadata.source_url == "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2"
    tiny_rec = store.get("tiny")  # the catalog's id, task, metadata (a flag over it) and settings
    assert tiny_rec is not None and [v.version for v in tiny_rec.versions] == ["1.0.0", "2.0.0"]
    assert tiny_rec is not None and tiny_rec.task == "txt2embed" and tiny_rec.settings == {"max_batch_size": 2}
    assert tiny_rec.metadata.display_name == "Tiny, renamed" and tiny_rec.metadata.description == "from the catalog"
    assert tiny_rec.metadata.config.vector_size == 4
    assert "chat_template.jinja" in tiny_rec.versions[0].files
