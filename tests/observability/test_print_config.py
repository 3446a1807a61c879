"""`mm serve --print-config`: the effective configuration (file < environment < flags) as TOML that
reads back, with secrets masked; an unknown key is refused naming it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

from modelmora.config import Settings, load_settings
from modelmora.configview import MASK, masked, render

from serverproc import mm

CONFIG = """
port = 1234
host = "127.0.0.1"
queue_limit = 7
result_secret = "hunter2"
registry_url = "postgresql://modelmora:pa55word@db.internal:5432/mm"
[s3]
bucket = "results"
secret_access_key = "wJalrXUtnFEMI"
[pipelines]
txt2embed = "mypkg.pipes:Embed"
"""


def test_env_wins_over_the_file_and_flags_over_both_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    env = {"MODELMORA_PORT": "4321", "MODELMORA_QUEUE_LIMIT": "9", "MODELMORA_S3__ACCESS_KEY_ID": "AKIAEXAMPLE"}
    proc = mm("serve", "--config", str(config), "--print-config", "--host", "0.0.0.0", home=tmp_path, env=env)
    out = proc.stdout
    for secret in ("hunter2", "pa55word", "wJalrXUtnFEMI", "AKIAEXAMPLE"):
        assert secret not in out
    data = tomllib.loads(out)
    assert data["port"] == 4321 and data["queue_limit"] == 9 and data["host"] == "0.0.0.0"
    assert data["result_secret"] == MASK
    assert data["registry_url"] == f"postgresql://modelmora:{MASK}@db.internal:5432/mm"
    assert data["s3"] == {**data["s3"], "bucket": "results", "secret_access_key": MASK, "access_key_id": MASK}
    assert data["pipelines"] == {"txt2embed": "mypkg.pipes:Embed"}
    assert data["home"] == str(tmp_path)
    assert msgspec.convert(data, Settings).port == 4321  # it reads back as a configuration


def test_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[s3]\nbuckett = 'x'\n")
    proc = mm("serve", "--config", str(config), "--print-config", home=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown key 's3.buckett'" in proc.stderr
    proc = mm("serve", "--print-config", home=tmp_path, env={"MODELMORA_QUEUE_LIMT": "3"}, check=False)
    assert proc.returncode == 2 and "MODELMORA_QUEUE_LIMT" in proc.stderr


def test_what_is_masked() -> None:
    settings = load_settings(
        None,
        environ={},
        home="/srv/mm",
        registry_url="sqlite:///srv/mm/registry.sqlite3",
        public_url="https://user@example.com/",
        result_secret="",
    )
    data = masked(settings)
    assert data["registry_url"] == "sqlite:///srv/mm/registry.sqlite3"  # no password in it
    assert data["public_url"] == "https://user@example.com/"
    assert data["result_secret"] == ""  # empty: nothing to hide (generated and kept in home)
    assert data["allow_private_urls"] is False and data["max_body_bytes"] == settings.max_body_bytes
    assert tomllib.loads(render(settings))["zygote_preload"] == list(settings.zygote_preload)
