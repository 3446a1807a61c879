"""`POST /v1/completions` and `POST /v1/chat/completions` over txt2txt models.

Supported: `max_tokens` (chat: also `max_completion_tokens`), `temperature`, `top_p`, `stop`,
`seed`, `n`, `stream` with `stream_options.include_usage`, and `usage` token counts. Chat
messages are rendered with the model's own chat template (`chat_template`); a model without
one answers 400. What we cannot honour is refused (400 naming the field) rather than ignored:
token-array prompts, `echo`, `logprobs`, `best_of` other than `n`, `suffix`, non-zero penalties,
`logit_bias`, tools and function calls, a `response_format` other than text, non-text content
parts. Completions default to 16 new tokens, as OpenAI's; chat runs until the model stops or its
context (or our limit of 4,096 new tokens) ends.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope

from ...errors import InvalidInput, ModelMoraError, ModelNotFound
from ...service import InferenceService
from ...tasks import TaskType
from .calls import options, read_request, served_model
from .chat_template import ChatTemplates
from .errors import Fields
from .generation import Generation, Shape, event_stream, open_streams, plan, respond
from .schemas import ChatChoice, ChatMessage, ChatRequest, CompletionChoice, CompletionRequest

__all__ = ("ChatShape", "Completions", "CompletionShape")

_encoder = msgspec.json.Encoder()
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_chat_decoder = msgspec.json.Decoder(ChatRequest)
_TASKS = (TaskType.TXT2TXT,)
_CHAT_MAX_TOKENS = 4096
_ROLES = {"system", "user", "assistant", "tool"}


class CompletionShape:
    object = "text_completion"
    chunk_object = "text_completion"

    def choice(self, index: int, text: str, reason: str) -> CompletionChoice:
        return CompletionChoice(index, text, reason)

    def opening(self, index: int) -> dict[str, Any] | None:
        return None

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": None}

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}


class ChatShape:
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, index: int, text: str, reason: str) -> ChatChoice:
        return ChatChoice(index, {"role": "assistant", "content": text}, reason)

    def opening(self, index: int) -> dict[str, Any] | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, text: str) -> dict[str, Any]:
        return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}


def _refuse(field: str, what: str) -> InvalidInput:
    return InvalidInput(f"{what} is not supported by this server", field=f"$.{field}")


def _check_sampling(req: CompletionRequest | ChatRequest) -> None:
    if req.frequency_penalty:
        raise _refuse("frequency_penalty", "a non-zero frequency_penalty")
    if req.presence_penalty:
        raise _refuse("presence_penalty", "a non-zero presence_penalty")
    if req.logit_bias:
        raise _refuse("logit_bias", "logit_bias")
    if req.logprobs not in (None, False, 0):
        raise _refuse("logprobs", "logprobs")


def _parameters(req: CompletionRequest | ChatRequest, max_tokens: int | None, special: bool) -> dict[str, Any]:
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    values = {
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "stop": stop,
        "seed": req.seed,
    }
    return {"add_special_tokens": special, **{k: v for k, v in values.items() if v is not None}}


def _prompts(value: str | list[Any]) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidInput("prompt must not be empty", field="$.prompt")
    if all(isinstance(v, str) for v in value):
        return [v for v in value if isinstance(v, str)]
    if all(isinstance(v, int) for v in value) or all(isinstance(v, list) for v in value):
        raise InvalidInput(
            "token arrays are not accepted: send the text (the server tokenizes it with the model's own tokenizer)",
            field="$.prompt",
        )
    bad = next(i for i, v in enumerate(value) if not isinstance(v, str))
    raise InvalidInput("expected a string", field=f"$.prompt[{bad}]")


def _content(message: ChatMessage, i: int) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidInput("only text content parts are supported", field=f"$.messages[{i}].content[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template reads them (keys without a value left out, `developer` as
    `system`)."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in _ROLES:
            raise InvalidInput(
                f"unknown role {m.role!r} (expected system, developer, user, assistant or tool)",
                field=f"$.messages[{i}].role",
            )
        values = {
            "role": role,
            "content": _content(m, i),
            "name": m.name,
            "tool_calls": m.tool_calls,
            "tool_call_id": m.tool_call_id,
        }
        out.append({k: v for k, v in values.items() if v is not None})
    return out


class Completions:
    """The two endpoints over the core, with the chat templates they have read."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.templates = ChatTemplates()

    async def completions(self, scope: Scope, receive: Receive) -> ASGIApp:
        """Raises: ModelMoraError, its field named as the body names it."""
        service = self.service
        fields = Fields("prompt")
        try:
            req = await read_request(scope, receive, _completion_decoder, service)
            opts = options(scope, req)
            _check_sampling(req)
            if req.echo:
                raise _refuse("echo", "echo")
            if req.suffix:
                raise _refuse("suffix", "suffix")
            n = req.n or 1
            if req.best_of not in (None, n):
                raise _refuse("best_of", "best_of other than n")
            prompts = _prompts(req.prompt)
            await served_model(service, req.model, _TASKS, "/v1/completions")
            params = _parameters(req, req.max_tokens or 16, True)
            gen = plan(req.model, prompts, n, params, opts, "prompt", isinstance(req.prompt, list))
        except ModelMoraError as exc:
            raise fields.rename(exc) from None
        return await self._answer(gen, CompletionShape(), req, receive)

    async def chat(self, scope: Scope, receive: Receive) -> ASGIApp:
        """Raises: ModelMoraError, its field named as the body names it."""
        service = self.service
        fields = Fields("messages", lambda i: None)
        try:
            req = await read_request(scope, receive, _chat_decoder, service)
            opts = options(scope, req)
            _check_sampling(req)
            if req.top_logprobs is not None:
                raise _refuse("top_logprobs", "top_logprobs")
            if req.tools or req.functions:
                raise _refuse("tools" if req.tools else "functions", "tool and function calling")
            if req.tool_choice not in (None, "none") or req.function_call not in (None, "none"):
                raise _refuse("tool_choice" if req.tool_choice else "function_call", "tool and function calling")
            if req.response_format is not None and req.response_format.get("type") != "text":
                raise _refuse("response_format", "a response_format other than text")
            messages = _messages(req.messages)
            rec = await served_model(service, req.model, _TASKS, "/v1/chat/completions")
            version = rec.version_record(opts.version)
            if version is None:
                raise ModelNotFound(f"model {req.model!r} has no version {opts.version!r}", field="$.version")
            template = await self.templates.get(version.path, version.created_at)
            if template is None:
                raise InvalidInput(
                    f"model {req.model!r} has no chat template; send a prompt to /v1/completions", field="$.model"
                )
            prompt = template.render(messages)
            max_tokens = req.max_completion_tokens or req.max_tokens or _CHAT_MAX_TOKENS
            params = _parameters(req, max_tokens, False)
            gen = plan(req.model, [prompt], req.n or 1, params, opts, "messages", False)
        except ModelMoraError as exc:
            raise fields.rename(exc) from None
        return await self._answer(gen, ChatShape(), req, receive)

    async def _answer(
        self, gen: Generation, shape: Shape, req: CompletionRequest | ChatRequest, receive: Receive
    ) -> ASGIApp:
        if req.stream:
            streams = await open_streams(self.service, gen)
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return event_stream(streams, gen, shape, req.model, include_usage)
        body = await respond(self.service, gen, shape, req.model, receive)
        return Response(_encoder.encode(body), media_type="application/json")
