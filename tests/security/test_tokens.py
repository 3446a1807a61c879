"""Tokens: the line format and every malformed entry (the message names the line, never the token),
digests instead of tokens, constant-time lookup, the `[auth]` settings (hidden from printing and from
config errors), the gate's answers, and the tokens file re-read when it changes or on SIGHUP."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from modelmora.config import ConfigError, load_settings
from modelmora.errors import PermissionDenied, Unauthenticated
from modelmora.security import (
    ANONYMOUS,
    OPEN,
    TOKEN,
    Gate,
    Identity,
    Scope,
    TokenError,
    TokenTable,
    bearer_token,
    follow_files,
    parse_tokens,
)

SECRET = "s3cr3t-token-value-0001"
OTHER = "another-token-value-0002"


def test_lines_give_names_scopes_and_digests() -> None:
    text = f"""
    # who may do what
    ci      infer            {SECRET}   # a comment after a blank
    ops     read,ADMIN       sha256:{hashlib.sha256(OTHER.encode()).hexdigest()}
    odd     infer            has#hash-inside-0003
    """
    entries = parse_tokens(text.splitlines(), "tokens.txt")
    assert [(i.name, sorted(i.scopes)) for i, _ in entries] == [
        ("ci", [Scope.INFER]),
        ("ops", [Scope.ADMIN, Scope.READ]),
        ("odd", [Scope.INFER]),
    ]
    table = TokenTable(entries)
    assert table.find(SECRET) == Identity("ci", frozenset({Scope.INFER}))
    found = table.find(OTHER)
    assert found is not None and found.name == "ops"  # given as its digest
    assert table.find("has#hash-inside-0003") is not None
    assert table.find("s3cr3t-token-value-000") is None
    assert table.find("") is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"ci {SECRET}", "tokens.txt, line 1: expected 'NAME SCOPE[,SCOPE...] TOKEN' (3 fields, found 2)"),
        (f"ci infer {SECRET} extra", "tokens.txt, line 1: expected 'NAME SCOPE[,SCOPE...] TOKEN' (3 fields, found 4)"),
        (
            f"ci infer,write {SECRET}",
            "tokens.txt, line 1: unknown scope 'write' (expected a comma-separated list of infer, read, admin)",
        ),
        (
            f"-ci infer {SECRET}",
            "tokens.txt, line 1: the name '-ci' is not a name (letters, digits, . _ @ : -; 64 at most)",
        ),
        ("ci infer short-0001", "tokens.txt, line 1: the token of 'ci' is shorter than 16 characters"),
        (
            "ci infer tökenwithumlaut-0001",
            "tokens.txt, line 1: the token of 'ci' holds characters other than visible ASCII",
        ),
    ],
)
def test_a_malformed_line_is_refused_naming_the_line_not_the_token(line: str, message: str) -> None:
    with pytest.raises(TokenError) as err:
        parse_tokens([line], "tokens.txt")
    assert str(err.value) == message
    assert SECRET not in str(err.value)


def test_a_name_or_a_token_given_twice_is_refused() -> None:
    with pytest.raises(TokenError, match=r"line 2: the name 'ci' is given twice"):
        parse_tokens([f"ci infer {SECRET}", f"ci read {OTHER}"], "f")
    with pytest.raises(TokenError) as err:
        parse_tokens([f"ci infer {SECRET}", f"ops read {SECRET}"], "f")
    assert str(err.value) == "f, line 2: the token of 'ops' is also another name's token"


def test_bearer_tokens_are_read_from_the_authorization_value() -> None:
    assert bearer_token(f"Bearer {SECRET}") == SECRET
    assert bearer_token(f"bearer   {SECRET} ") == SECRET
    assert bearer_token(f"Basic {SECRET}") is None
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_inline_tokens_from_the_environment_stay_hidden(tmp_path: Path) -> None:
    env = {"MODELMORA_AUTH__TOKENS": f"ci infer {SECRET};ops read,admin {OTHER}\n"}
    settings = load_settings(None, environ=env)
    assert settings.auth.enabled and len(settings.auth.tokens) == 2
    assert SECRET not in repr(settings) and SECRET not in str(settings.auth)
    assert "tokens=<2 hidden>" in repr(settings.auth)
    config = tmp_path / "config.toml"
    config.write_text(f'[auth]\ntokens = "ci infer {SECRET}"\n')  # a string where a list belongs
    with pytest.raises(ConfigError) as err:
        load_settings(config, environ={})
    assert str(err.value) == f"invalid configuration: auth.tokens must be array (in {config})"
    config.write_text(f'[auth]\ntokens = [1, "ci infer {SECRET}"]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(config, environ={})
    assert SECRET not in str(err.value) and str(err.value).startswith("invalid configuration: auth.tokens must be")


def test_auth_is_off_without_tokens_and_on_with_a_tokens_file(tmp_path: Path) -> None:
    assert not load_settings(None, environ={}).auth.enabled
    off = Gate(load_settings(None, environ={}).auth)
    assert off.admit(Scope.ADMIN, None).identity == ANONYMOUS
    empty = tmp_path / "tokens"
    empty.write_text("# nobody yet\n")
    gate = Gate(load_settings(None, environ={"MODELMORA_AUTH__TOKENS_FILE": str(empty)}).auth)
    assert gate.enabled and len(gate.table) == 0
    with pytest.raises(Unauthenticated):
        gate.admit(Scope.INFER, f"Bearer {SECRET}")
    public = gate.admit(OPEN, None).identity  # an open endpoint: anonymous, with no scope
    assert (public.name, public.scopes) == ("anonymous", frozenset())


def _gate(*lines: str) -> Gate:
    return Gate(load_settings(None, environ={}, auth={"tokens": list(lines)}).auth)


def test_the_gate_answers_401_403_or_the_identity() -> None:
    gate = _gate(f"ci infer {SECRET}", f"ops read,admin {OTHER}")
    with pytest.raises(Unauthenticated) as none:
        gate.admit(Scope.INFER, None)
    assert none.value.challenge == 'Bearer realm="modelmora"'
    assert none.value.message == "this endpoint needs a token: send 'Authorization: Bearer <token>'"
    with pytest.raises(Unauthenticated) as wrong:
        gate.admit(Scope.INFER, "Bearer not-a-known-token-0000")
    assert wrong.value.challenge == 'Bearer realm="modelmora", error="invalid_token"'
    assert "not-a-known" not in wrong.value.message
    with pytest.raises(PermissionDenied) as scope:
        gate.admit(Scope.ADMIN, f"Bearer {SECRET}")
    assert scope.value.message == "the token 'ci' lacks the 'admin' scope"
    assert scope.value.challenge == 'Bearer realm="modelmora", error="insufficient_scope", scope="admin"'
    assert gate.admit(Scope.INFER, f"Bearer {SECRET}").identity.name == "ci"
    assert gate.admit(TOKEN, f"Bearer {SECRET}").identity.name == "ci"  # any known token
    assert gate.admit(Scope.ADMIN, f"Bearer {OTHER}").identity.name == "ops"
    assert gate.refused == 3


def test_a_tokens_file_clashing_with_inline_tokens_or_unreadable_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"ci read {OTHER}\n")
    settings = load_settings(None, environ={}, auth={"tokens": [f"ci infer {SECRET}"], "tokens_file": str(path)})
    with pytest.raises(TokenError, match=f"^{path}: the name 'ci' is also in \\[auth\\] tokens$"):
        Gate(settings.auth)
    missing = load_settings(None, environ={}, auth={"tokens_file": str(tmp_path / "nope")})
    with pytest.raises(TokenError, match=r"^cannot read the tokens file .*nope: No such file or directory$"):
        Gate(missing.auth)


def test_a_reload_that_fails_keeps_the_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"ci infer {SECRET}\n")
    gate = Gate(load_settings(None, environ={}, auth={"tokens_file": str(path)}).auth)
    path.write_text(f"ci infer {SECRET}\nbroken line\n")
    assert not gate.reload()
    assert gate.table.names == ["ci"]
    path.write_text(f"ops admin {OTHER}\n")  # ci revoked, ops added
    assert gate.reload()
    assert gate.table.find(SECRET) is None and gate.table.names == ["ops"]


async def until(check: Callable[[], bool]) -> None:
    """Return once `check()` holds (within a safety net of 30 s, never a performance bound)."""
    with anyio.fail_after(30):
        while True:
            if check():
                return
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_the_tokens_file_is_followed_and_reloaded_on_sighup(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"ci infer {SECRET}\n")
    gate = Gate(load_settings(None, environ={}, auth={"tokens_file": str(path)}).auth)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: follow_files([gate], poll_s=0.02, task_status=task_status))
        replacement = tmp_path / "tokens.new"
        replacement.write_text(f"ops admin {OTHER}\n")
        replacement.rename(path)  # an atomic replace, as editors and Kubernetes do
        await until(lambda: gate.table.names == ["ops"])  # the next poll sees it
        stat = path.stat()
        path.write_text(f"abc admin {OTHER}\n")  # in place, same size, and the mtime put back:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # polling cannot tell, SIGHUP does
        await anyio.sleep(0.1)  # a few polls
        assert gate.table.names == ["ops"]
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: gate.table.names == ["abc"])
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_bad_tokens_file_stops_the_server_in_one_line(tmp_path: Path) -> None:
    from modelmora.server import StartupError, serve

    path = tmp_path / "tokens"
    path.write_text(f"ci infer {SECRET}\nops nope {OTHER}\n")
    settings = load_settings(None, environ={}, home=str(tmp_path / "home"), auth={"tokens_file": str(path)})
    with pytest.raises(StartupError) as err:
        await serve(settings)
    assert (
        str(err.value)
        == f"{path}, line 2: unknown scope 'nope' (expected a comma-separated list of infer, read, admin)"
    )
