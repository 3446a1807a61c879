"""Chat templates rendered in the supervisor give the prompt the model's own tokenizer renders
(transformers' `apply_chat_template`), wherever the template is kept; refusals, failures and
sandbox escapes are 400s of the request, not errors of the server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from modelmora.api.openai import ChatTemplates, load_chat_template
from modelmora.errors import InvalidInput

from conftest import BOTH_BACKENDS
from tiny_models import build_gpt2

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Réponds brièvement."},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi!"},
    {"role": "user", "content": "and now?"},
]

TEMPLATES = {
    "plain": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "special tokens, trimmed blocks": "{{ bos_token }}\n{% for m in messages %}\n"
    "  {{ m.role }}: {{ m.content }}{{ eos_token }}\n{% endfor %}\n{% if add_generation_prompt %}assistant:{% endif %}",
    "tojson, namespace, loop controls": "{% set ns = namespace(n=0) %}{% for m in messages %}"
    "{% if m.role == 'assistant' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{{ m | tojson }}{% endfor %}[{{ ns.n }}]",
    "generation block": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}|{% endfor %}",
}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("chat") / "gpt2")


def with_template(gpt2: Path, dest: Path, template: str) -> tuple[Path, str]:
    """A copy of the model whose tokenizer has `template`, and what transformers renders with it."""
    from transformers import AutoTokenizer

    shutil.copytree(gpt2, dest)
    tokenizer = AutoTokenizer.from_pretrained(dest)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(dest)
    reloaded = AutoTokenizer.from_pretrained(dest)
    rendered = reloaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert isinstance(rendered, str)
    return dest, rendered


@pytest.mark.parametrize("name", TEMPLATES)
def test_renders_as_the_tokenizer_does(gpt2: Path, tmp_path: Path, name: str) -> None:
    model, expected = with_template(gpt2, tmp_path / "model", TEMPLATES[name])
    template = load_chat_template(model)
    assert template is not None
    assert template.render(MESSAGES) == expected


def test_named_templates_in_the_tokenizer_config(gpt2: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(gpt2, model)
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools!"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[-1].content }}"},
    ]
    config["bos_token"] = {"content": "<|endoftext|>", "lstrip": False, "__type": "AddedToken"}
    config_file.write_text(json.dumps(config))
    expected = AutoTokenizer.from_pretrained(model).apply_chat_template(MESSAGES, tokenize=False)
    template = load_chat_template(model)
    assert template is not None and template.render(MESSAGES) == expected == "<|endoftext|>and now?"


def test_no_template_and_a_broken_one(gpt2: Path, tmp_path: Path) -> None:
    assert load_chat_template(gpt2) is None
    model = tmp_path / "model"
    shutil.copytree(gpt2, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(InvalidInput) as broken:
        load_chat_template(model)
    assert broken.value.field == "$.model" and "does not compile" in broken.value.message


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ raise_exception('roles must alternate') }}", "refused these messages: roles must alternate"),
        ("{{ ''.__class__.__mro__ }}", "refused these messages"),  # the sandbox
        ("{% set ns = namespace(_x=1) %}", "may not start with '_'"),
        ("{{ messages[0].content + 1 }}", "failed on these messages (TypeError"),
    ],
)
def test_refusals_and_failures_are_invalid_input(gpt2: Path, tmp_path: Path, template: str, message: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(gpt2, model)
    (model / "chat_template.jinja").write_text(template)
    loaded = load_chat_template(model)
    assert loaded is not None
    with pytest.raises(InvalidInput) as refused:
        loaded.render(MESSAGES)
    assert refused.value.field == "$.messages" and message in refused.value.message, refused.value.message


@pytest.mark.anyio
@BOTH_BACKENDS
async def test_templates_are_read_once_per_installed_version(gpt2: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(gpt2, model)
    (model / "chat_template.jinja").write_text("one")
    templates = ChatTemplates()
    first = await templates.get(str(model), 1.0)
    assert first is not None and first.render([]) == "one"
    (model / "chat_template.jinja").write_text("two")
    assert await templates.get(str(model), 1.0) is first  # the same version: cached
    second = await templates.get(str(model), 2.0)  # reinstalled
    assert second is not None and second.render([]) == "two"
