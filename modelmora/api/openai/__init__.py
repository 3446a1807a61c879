"""The OpenAI-compatible front end (`/v1/embeddings`, `/v1/completions`, `/v1/chat/completions`,
`/v1/images/generations`, `/v1/models`): a thin adapter over `modelmora.service`. The headers that
carry our options are in `calls` (`PRIORITY_HEADER`, `TIMEOUT_HEADER`, `VERSION_HEADER`)."""

from .app import PREFIX, create_openai_app
from .chat_template import ChatTemplate, ChatTemplates, load_chat_template

__all__ = ("PREFIX", "ChatTemplate", "ChatTemplates", "create_openai_app", "load_chat_template")
