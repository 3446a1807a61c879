"""What the client refuses before sending anything (each bad argument: `InvalidArgumentError` naming
it, attempts 0), and a closed client. No server needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelmora.client import AsyncClient, InvalidArgumentError, Status

pytestmark = pytest.mark.anyio

MINILM = "minilm"


@pytest.mark.parametrize(
    ("call", "field", "message"),
    [
        (lambda c: c.embed(MINILM), "texts", "texts: give texts or images (one of them)"),
        (lambda c: c.embed(MINILM, []), "texts", "texts: give at least one text"),
        (lambda c: c.embed(MINILM, ["a", 3]), "texts[1]", "texts[1]: expected a string, got int"),
        (lambda c: c.embed("clip", images=[b"x", "photo.png"]), "images[1]", "images[1]: a string image must be"),
        (lambda c: c.embed("clip", images=np.zeros((4, 4), np.uint8)), "images[0]", "images[0]: an array image"),
        (lambda c: c.embed("clip", images=[Path("/nonexistent.png")]), "images[0]", "images[0]: cannot read"),
        (lambda c: c.embed("clip", images=[1.5]), "images[0]", "images[0]: unsupported image type float"),
        (lambda c: c.embed(MINILM, "x", priority="urgent"), "priority", "priority: unknown priority 'urgent'"),
        (lambda c: c.embed(MINILM, "x", priority=7), "priority", "priority: unknown priority 7 (1-4 or a name)"),
        (lambda c: c.generate_image("sd", "x", return_mode="file"), "return_mode", "return_mode: unknown return"),
        (lambda c: c.models("txt2sound"), "task_type", "task_type: unknown task type 'txt2sound'"),
    ],
)
async def test_arguments_refused_before_sending(call, field: str, message: str) -> None:  # type: ignore[no-untyped-def]
    async with AsyncClient("127.0.0.1:9") as client:  # nothing is sent: no server needed
        with pytest.raises(InvalidArgumentError) as err:
            await call(client)
    assert (err.value.status, err.value.field, err.value.attempts) == (Status.INVALID_ARGUMENT, field, 0)
    assert err.value.message.startswith(message), err.value.message


async def test_a_closed_client_refuses_calls() -> None:
    client = AsyncClient("127.0.0.1:9")
    await client.close()
    with pytest.raises(RuntimeError, match="the client is closed"):
        await client.models()
    with pytest.raises(ValueError, match="target must be host:port"):
        AsyncClient("localhost")


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_the_async_client_says_it_needs_asyncio() -> None:
    client = AsyncClient("127.0.0.1:9")
    with pytest.raises(RuntimeError, match=r"needs a running asyncio event loop \(grpclib\)"):
        await client.models()
    await client.close()
