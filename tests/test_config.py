"""Settings: defaults < file < environment < explicit overrides; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelmora.config import ConfigError, load_settings


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(environ={"MODELMORA_HOME": str(tmp_path)})
    assert s.host == "127.0.0.1" and s.port == 8000
    assert s.home_path == tmp_path
    assert s.queue_limit >= 256
    assert s.effective_torch_threads >= 1


def test_default_home_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELMORA_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert load_settings(environ={}).home_path == tmp_path / "modelmora"


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 9001\nmax_batch_size = 8\n[timeout_s]\ntxt2embed = 5.0\n[pipelines]\ntxt2embed = "a:B"\n')
    env = {"MODELMORA_PORT": "9002", "MODELMORA_TIMEOUT_S__TXT2TXT": "7"}
    s = load_settings(cfg, environ=env, max_batch_size=16)
    assert s.port == 9002  # env over file
    assert s.max_batch_size == 16  # explicit over everything
    assert s.timeout_s.txt2embed == 5.0 and s.timeout_s.txt2txt == 7.0
    assert s.pipelines == {"txt2embed": "a:B"}
    # MODELMORA_CONFIG and $MODELMORA_HOME/config.toml are found too
    assert load_settings(environ={"MODELMORA_CONFIG": str(cfg)}).port == 9001
    (tmp_path / "config.toml").write_text("port = 9003\n")
    assert load_settings(environ={"MODELMORA_HOME": str(tmp_path)}).port == 9003


@pytest.mark.parametrize(
    ("content", "env", "needle"),
    [
        ("nonsense = 1\n", {}, "nonsense"),
        ("port = 'x'\n", {}, "$.port"),
        ("port = [\n", {}, "cannot read"),
        ("", {"MODELMORA_BOGUS": "1"}, "MODELMORA_BOGUS"),
        ("", {"MODELMORA_NOPE__X": "1"}, "MODELMORA_NOPE__X"),
        ("", {"MODELMORA_TIMEOUT_S__NOPE": "1"}, "nope"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, content: str, env: dict[str, str], needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ=env)
    assert needle in str(info.value)
