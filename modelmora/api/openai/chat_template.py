"""A txt2txt model's own chat template, rendered in the supervisor.

The template comes from the model's files, as the Hugging Face tokenizer keeps it:
`chat_template.jinja`, else `chat_template` in `tokenizer_config.json` (a string, or named
templates of which "default" is used), else `chat_template.json`. It is rendered as the tokenizer
renders it: a sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`, loop controls,
a `{% generation %}` block (rendered as its body), `raise_exception`, `strftime_now`, a `tojson`
that keeps non-ASCII text, and the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
in scope. The worker then tokenizes the rendered prompt without adding special tokens (the
template wrote those it wants).

Rendering here, not in the worker, means a conversation the template refuses (e.g. roles that do
not alternate) fails only its own request with a 400, never the batch it would have joined.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from ...errors import InvalidInput

if TYPE_CHECKING:
    import jinja2

__all__ = ("ChatTemplate", "ChatTemplates", "load_chat_template")

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    template: jinja2.Template
    special_tokens: dict[str, Any]

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for `messages`, ending with the assistant's turn.

        Raises:
            InvalidInput: the template refused the conversation (its own message), or failed on it.
        """
        import jinja2

        try:
            return self.template.render(
                messages=messages, tools=None, documents=None, add_generation_prompt=True, **self.special_tokens
            )
        except jinja2.TemplateError as exc:
            raise InvalidInput(f"the model's chat template refused these messages: {exc}", field="$.messages") from None
        except Exception as exc:  # a template is code from the model's authors; its errors are theirs
            raise InvalidInput(
                f"the model's chat template failed on these messages ({type(exc).__name__}: {exc})",
                field="$.messages",
            ) from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _template_source(model_dir: Path, config: Any) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for source in (config, _read_json(model_dir / "chat_template.json")):
        found = source.get("chat_template") if isinstance(source, dict) else None
        if isinstance(found, str):
            return found
        if isinstance(found, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
            default = named.get("default")
            if isinstance(default, str):
                return default
    return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])  # a saved AddedToken
    return None


def _special_tokens(model_dir: Path, config: Any) -> dict[str, Any]:
    tokens: dict[str, Any] = {}
    sources = [config, _read_json(model_dir / "special_tokens_map.json")]
    for source in sources:
        if not isinstance(source, dict):
            continue
        for name in _SPECIAL:
            text = _token_text(source.get(name))
            if text is not None:
                tokens.setdefault(name, text)
        extra = source.get("additional_special_tokens")
        if isinstance(extra, list) and "additional_special_tokens" not in tokens:
            tokens["additional_special_tokens"] = [t for t in map(_token_text, extra) if t is not None]
    return tokens


def _environment() -> jinja2.Environment:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (marks the assistant's text for training): its body."""

        tags = {"generation"}  # noqa: RUF012 - jinja2 reads it from the class

        def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        """`namespace(...)` refusing names that start with "_" (no way to CPython's internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            for name in dict(*rest, **kwargs):
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

        def __setitem__(self, name: str, value: Any) -> None:
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = Namespace
    return env


def load_chat_template(model_dir: Path) -> ChatTemplate | None:
    """The model's chat template, compiled; None when it has none.

    Raises:
        InvalidInput: the template is not valid jinja2.
    """
    import jinja2

    config = _read_json(model_dir / "tokenizer_config.json")
    source = _template_source(model_dir, config)
    if source is None:
        return None
    try:
        template = _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise InvalidInput(f"the model's chat template does not compile: {exc}", field="$.model") from None
    return ChatTemplate(template, _special_tokens(model_dir, config))


class ChatTemplates:
    """Compiled chat templates by model version directory (read and compiled once, off the event loop)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, float], ChatTemplate | None] = {}

    async def get(self, model_dir: str, installed_at: float) -> ChatTemplate | None:
        """The template of the version installed at `model_dir` at `installed_at` (a reinstall
        replaces the files: its new time reads them again)."""
        key = (model_dir, installed_at)
        if key not in self._cache:
            template = await anyio.to_thread.run_sync(load_chat_template, Path(model_dir))
            self._cache = {k: v for k, v in self._cache.items() if k[0] != model_dir}
            self._cache[key] = template
        return self._cache[key]
