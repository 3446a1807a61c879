"""The `mm` registry commands beyond install/list/info/uninstall: metadata flags and files,
--json, tables that never cut an id, versions (activate, pin, uninstall ID@VERSION)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import home, run_cli, st_dir

from modelmora.registry import SQLiteStore

__all__ = ("home", "st_dir")  # fixtures, used by name

Cap = pytest.CaptureFixture[str]
MP = pytest.MonkeyPatch


def one_line_error(capsys: Cap, monkeypatch: MP, *args: str) -> str:
    code, out, err = run_cli(capsys, monkeypatch, *args)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_install_with_metadata_flags_and_file(
    home: Path, st_dir: Path, tmp_path: Path, capsys: Cap, monkeypatch: MP
) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"description": "from the file", "config": {"max_length": 128}, "params": {"a": 1}}))
    code, out, err = run_cli(
        capsys, monkeypatch, "install", str(st_dir), "--id", "m", "--name", "My model", "--metadata", str(meta),
        "--memory-mb", "600", "--vector-size", "384", "--param", "pooling=mean", "--param", "dims=[1, 2]",
    )  # fmt: skip
    assert code == 0, err
    code, out, _ = run_cli(capsys, monkeypatch, "info", "m", "--json")
    data = json.loads(out)
    assert data["metadata"] == {
        "display_name": "My model",
        "description": "from the file",
        "resources": {"memory_mb": 600.0},
        "config": {"vector_size": 384, "max_length": 128},
        "params": {"a": 1, "pooling": "mean", "dims": [1, 2]},
    }
    assert data["task_type"] == "txt2embed" and data["created_at"] == data["updated_at"] > 0
    assert data["versions"][0]["checksums"]["model.safetensors"] and data["versions"][0]["files"] == 4
    code, out, _ = run_cli(capsys, monkeypatch, "info", "m")
    assert code == 0 and "My model" in out and "memory_mb=600.0" in out and "pooling" in out

    code, out, _ = run_cli(capsys, monkeypatch, "metadata", "m", "--name", "Renamed", "--cpu-threads", "2")
    assert code == 0
    rec = SQLiteStore(home / "registry.sqlite3").get("m")
    assert rec is not None and rec.metadata.display_name == "Renamed"
    assert rec.metadata.resources.cpu_threads == 2 and rec.metadata.resources.memory_mb == 600.0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--memory-mb", "-1"], "metadata.resources.memory_mb: expected `float` > 0"),
        (["--cpu-threads", "0"], "metadata.resources.cpu_threads: expected `int` >= 1"),
        (["--source-url", "not a url"], "metadata.source_url: expected an http://, https:// or s3:// URL"),
        (["--task", "txt2txt", "--no-check", "--vector-size", "8"], "metadata.config.vector_size: applies to"),
        (["--param", "novalue"], "--param 'novalue': expected KEY=VALUE"),
        (["--metadata", "{missing}"], "cannot read the metadata file"),
        (["--metadata", "{bad}"], "is not valid JSON"),
        (["--metadata", "{unknown}"], "metadata.colour: unknown field"),
        (["--version", "1.0"], "'1.0' is not a semantic version"),
    ],
)
def test_bad_install_flags_are_one_line_naming_the_field(
    home: Path, st_dir: Path, tmp_path: Path, capsys: Cap, monkeypatch: MP, args: list[str], needle: str
) -> None:
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "unknown.json").write_text('{"colour": "red"}')
    files = {"missing": tmp_path / "missing.json", "bad": tmp_path / "bad.json", "unknown": tmp_path / "unknown.json"}
    args = [a.format(**files) for a in args]
    line = one_line_error(capsys, monkeypatch, "install", str(st_dir), *args)
    assert needle in line
    assert SQLiteStore(home / "registry.sqlite3").list() == []


def test_list_json_and_tables_that_never_cut_an_id(home: Path, st_dir: Path, capsys: Cap, monkeypatch: MP) -> None:
    long_id = "a-model-with-a-really-long-identifier-" + "x" * 60
    assert run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", long_id)[0] == 0
    assert run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "short", "--name", "Short one")[0] == 0
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal setting; stdout is not a terminal here
    code, out, _ = run_cli(capsys, monkeypatch, "list")
    assert code == 0 and long_id in out and "Short one" in out
    code, out, _ = run_cli(capsys, monkeypatch, "list", "--json")
    assert [m["id"] for m in json.loads(out)] == [long_id, "short"]
    code, out, _ = run_cli(capsys, monkeypatch, "list", "--json", "--task", "txt2img")
    assert json.loads(out) == []


def test_versions_activate_pin_and_uninstall_one(home: Path, st_dir: Path, capsys: Cap, monkeypatch: MP) -> None:
    for version in ("1.0.0", "1.2.0", "1.10.0"):
        assert run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m", "--version", version)[0] == 0
    store = SQLiteStore(home / "registry.sqlite3")
    assert store.get("m").active_version == "1.0.0"  # type: ignore[union-attr]

    code, out, _ = run_cli(capsys, monkeypatch, "activate", "m", "1.10.0")
    assert code == 0 and "active version 1.10.0 (was 1.0.0)" in out
    code, out, _ = run_cli(capsys, monkeypatch, "list")
    assert "1.0.0, 1.2.0, 1.10.0" in out  # semantic-version order

    code, out, _ = run_cli(capsys, monkeypatch, "activate", "m", "1.2.0", "--pin")  # a downgrade, pinned
    assert code == 0 and "(pinned)" in out
    code, _, err = run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m", "--version", "2.0.0", "--activate")
    assert code == 1 and "pinned to version 1.2.0" in err
    code, out, _ = run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m", "--version", "2.0.0")
    assert code == 0 and "active version stays 1.2.0" in out
    assert run_cli(capsys, monkeypatch, "activate", "m", "1.2.0", "--no-pin")[0] == 0
    code, out, _ = run_cli(capsys, monkeypatch, "install", str(st_dir), "--id", "m", "--version", "2.1.0", "--activate")
    assert code == 0 and "stays" not in out
    assert store.get("m").active_version == "2.1.0"  # type: ignore[union-attr]

    assert "is the active one" in one_line_error(capsys, monkeypatch, "uninstall", "m@2.1.0")
    assert "has no version '9.9.9'" in one_line_error(capsys, monkeypatch, "uninstall", "m@9.9.9")
    assert "not a semantic version" in one_line_error(capsys, monkeypatch, "uninstall", "m@latest")
    code, out, _ = run_cli(capsys, monkeypatch, "uninstall", "m@1.0.0")
    assert code == 0 and "uninstalled m 1.0.0 (left: 1.2.0, 1.10.0, 2.0.0, 2.1.0)" in out
    assert not (home / "models" / "m" / "1.0.0").exists() and (home / "models" / "m" / "1.2.0").is_dir()

    assert "has no version 3.0.0 (installed:" in one_line_error(capsys, monkeypatch, "activate", "m", "3.0.0")
    assert "not a semantic version" in one_line_error(capsys, monkeypatch, "activate", "m", "two")
    assert "not installed" in one_line_error(capsys, monkeypatch, "activate", "nope", "1.0.0")
    store.close()
