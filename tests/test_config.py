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
        ("port = 'x'\n", {}, "port must be an integer (got 'x', in "),
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


@pytest.mark.parametrize(
    ("env", "overrides", "needle"),
    [
        (
            {"MODELMORA_REQUEST_RING_MB": "-5"},
            {},
            "request_ring_mb must be an integer >= 1 (got '-5', from MODELMORA_REQUEST_RING_MB)",
        ),
        ({}, {"request_ring_mb": 0}, "request_ring_mb must be an integer >= 1 (got 0"),
        ({}, {"response_ring_mb": 0}, "response_ring_mb must be an integer >= 1"),
        ({}, {"port": 99999}, "port must be an integer <= 65535"),
        ({}, {"max_connections": 0}, "max_connections must be an integer >= 1"),
        ({}, {"keep_alive_timeout_s": 0}, "keep_alive_timeout_s must be a number > 0"),
        ({}, {"queue_limit": 0}, "queue_limit must be"),
        ({}, {"max_batch_size": -1}, "max_batch_size must be"),
        ({}, {"max_body_bytes": 0}, "max_body_bytes must be"),
        ({}, {"shutdown_grace_s": -1}, "shutdown_grace_s must be a number >= 0"),
        (
            {"MODELMORA_TIMEOUT_S__TXT2TXT": "0"},
            {},
            "timeout_s.txt2txt must be a number > 0.0 (got '0', from MODELMORA_TIMEOUT_S__TXT2TXT)",
        ),
        (
            {"MODELMORA_LOG_LEVEL": "verbose"},
            {},
            "log_level must be one of 'debug', 'info', 'warning', 'error', 'critical'",
        ),
        ({"MODELMORA_LOG_FORMAT": "xml"}, {}, "log_format must be one of 'auto', 'console', 'json' (got 'xml'"),
        ({}, {"backend": "curio"}, "backend must be one of 'asyncio', 'trio'"),
        ({"MODELMORA_KEEP_ALIVE": "forever"}, {}, "keep_alive must be a duration like '30s', '10m'"),
        ({"MODELMORA_S3__ADDRESSING_STYLE": "zz"}, {}, "s3.addressing_style must be one of 'auto', 'path', 'virtual'"),
    ],
)
def test_bad_values_are_one_line_in_words(
    tmp_path: Path, env: dict[str, str], overrides: dict[str, object], needle: str
) -> None:
    """Sizes, counts and durations are bounded at load time (not at the first model load); the
    message is one line naming the key, saying what is expected in words (never a raw regex)."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ={"MODELMORA_HOME": str(tmp_path), **env}, **overrides)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message and "regex" not in message and "$." not in message


def test_names_of_levels_and_formats_ignore_case(tmp_path: Path) -> None:
    s = load_settings(
        environ={"MODELMORA_HOME": str(tmp_path), "MODELMORA_LOG_LEVEL": "DEBUG", "MODELMORA_LOG_FORMAT": "JSON"}
    )
    assert (s.log_level, s.log_format, s.backend) == ("debug", "json", "asyncio")
    assert (s.max_connections, s.keep_alive_timeout_s) == (1000, 5.0)
