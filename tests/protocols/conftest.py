"""One `mm serve` for the protocol tests of this package, stopped after its last test (asyncio:
grpclib, and the official clients' own traps): the real all-MiniLM-L6-v2, and tiny local models for
the other task types (a GPT-2 with and one without a chat template, a CLIP, a Stable Diffusion)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from modelmora.ipc import segments

from serverproc import ServerProcess, mm
from tiny_models import build_clip, build_gpt2, build_sd

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'system' and not loop.first %}"
    "{{ raise_exception('the system message must come first') }}"
    "{% endif %}"
    "<|{{ m.role }}|>{{ m.content }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""The chat model's template: each message on its line, the system message first or not at all."""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Iterator[ServerProcess]:
    src = tmp_path_factory.mktemp("protocol-models")
    home = tmp_path_factory.mktemp("protocols-home")
    gpt2 = build_gpt2(src / "gpt2")
    chat = build_gpt2(src / "gpt2-chat")
    (chat / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    mm("install", str(minilm_path), "--id", "minilm", "--task", "txt2embed", home=home)
    mm("install", str(gpt2), "--id", "gpt2", home=home)
    mm("install", str(chat), "--id", "gpt2-chat", home=home)
    mm("install", str(build_clip(src / "clip")), "--id", "clip", home=home)
    mm("install", str(build_sd(src / "sd")), "--id", "sd", home=home)
    env = {"MODELMORA_TORCH_THREADS": "1", "MODELMORA_ZYGOTE_PRELOAD": "numpy,torch,transformers"}
    srv = ServerProcess(home, env).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0
        assert [n for n in segments.our_segments() if n.startswith(f"mm-{srv.pid}-")] == []


def native(server: ServerProcess, model: str, body: dict[str, object]) -> dict[str, object]:
    """The native API's answer (`POST /api/v1/infer/{model}`)."""
    r = httpx.post(f"{server.url}/api/v1/infer/{model}", json=body, timeout=180)
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()["output"]
    return out


def native_embeddings(server: ServerProcess, model: str, inputs: dict[str, object]) -> np.ndarray:
    return np.array(native(server, model, {"input_data": inputs})["embeddings"], dtype=np.float32)


def png_bytes(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
