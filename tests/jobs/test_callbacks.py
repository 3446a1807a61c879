"""Job callbacks against a local receiver (a real socket), on asyncio and trio: delivered once per
final status, signature verifiable, retried when the receiver fails, given up after
`callback_max_attempts`, and refused for private addresses unless allowed, or without a secret."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import anyio.abc
import pytest

from jobs.conftest import JobsApp
from modelmora.jobs import sign

pytestmark = pytest.mark.anyio

SECRET = "callback-test-secret"
CALLBACKS = {"callback_secret": SECRET, "allow_private_urls": True, "callback_retry_base_s": 0.01}


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server: records each request, answers with the next scripted status."""

    statuses: list[int]
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""
    arrived: anyio.Event = field(default_factory=anyio.Event)

    async def handle(self, conn: anyio.abc.SocketStream) -> None:
        async with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await conn.receive()
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            while len(body) < int(headers.get("content-length", "0")):
                body += await conn.receive()
            self.requests.append((headers, body))
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            await conn.send(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            self.arrived.set()
            self.arrived = anyio.Event()


@pytest.fixture
async def receiver(request: pytest.FixtureRequest) -> AsyncIterator[Receiver]:
    mark = request.node.get_closest_marker("answers")
    rec = Receiver(list(mark.args) if mark else [200])
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    rec.url = f"http://127.0.0.1:{port}/hook?x=1"
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, rec.handle)
        yield rec
        tg.cancel_scope.cancel()


async def _submit(app: JobsApp, receiver: Receiver, text: str = "hi") -> str:
    body = {"input_data": {"text": text}, "callback_url": receiver.url}
    r = await app.client.post("/api/v1/infer/echo/async", json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


async def _callback_state(
    app: JobsApp, job_id: str, final: tuple[str, ...] = ("delivered", "failed")
) -> tuple[str, int]:
    while True:
        rec = await app.jobs.get(job_id)
        assert rec is not None
        if rec.callback_state in final:
            return rec.callback_state or "", rec.callback_attempts
        await anyio.sleep(0.02)


@pytest.mark.settings(**CALLBACKS)
async def test_delivered_once_and_signed(jobs_app: JobsApp, receiver: Receiver) -> None:
    job_id = await _submit(jobs_app, receiver)
    assert await _callback_state(jobs_app, job_id) == ("delivered", 1)
    ((headers, body),) = receiver.requests
    assert headers["x-modelmora-signature"] == sign(SECRET.encode(), headers["x-modelmora-timestamp"], body)
    assert headers["x-modelmora-job"] == job_id and headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["job_id"] == job_id and payload["status"] == "completed" and payload["attempts"] == 1
    assert payload["result_url"] == f"/api/v1/jobs/{job_id}/result" and payload["error"] is None


@pytest.mark.settings(**CALLBACKS)
@pytest.mark.answers(500, 503, 204)
async def test_retried_until_the_receiver_accepts(jobs_app: JobsApp, receiver: Receiver) -> None:
    job_id = await _submit(jobs_app, receiver)
    assert await _callback_state(jobs_app, job_id) == ("delivered", 3)
    assert len(receiver.requests) == 3
    assert len({body for _, body in receiver.requests}) == 1  # the same status each time
    text = (await jobs_app.client.get("/metrics")).text
    assert 'modelmora_job_callbacks_total{outcome="retried"} 2.0' in text
    assert 'modelmora_job_callbacks_total{outcome="delivered"} 1.0' in text


@pytest.mark.settings(**CALLBACKS, callback_max_attempts=2)
@pytest.mark.answers(500)
async def test_given_up_after_max_attempts(jobs_app: JobsApp, receiver: Receiver) -> None:
    job_id = await _submit(jobs_app, receiver)
    assert await _callback_state(jobs_app, job_id) == ("failed", 2)
    assert len(receiver.requests) == 2


@pytest.mark.settings(**CALLBACKS, job_concurrency=1)
async def test_a_cancelled_job_calls_back_too(jobs_app: JobsApp, receiver: Receiver) -> None:
    blocker = await jobs_app.client.post("/api/v1/infer/echo/async", json={"input_data": {"text": "__steps__300"}})
    job_id = await _submit(jobs_app, receiver)  # queued behind the blocker
    assert (await jobs_app.client.delete(f"/api/v1/jobs/{job_id}")).json()["status"] == "cancelled"
    assert await _callback_state(jobs_app, job_id) == ("delivered", 1)
    assert json.loads(receiver.requests[0][1])["status"] == "cancelled"
    await jobs_app.client.delete(f"/api/v1/jobs/{blocker.json()['job_id']}")


def _case(settings: dict[str, object], url: str, message: str) -> object:
    return pytest.param(url, message, marks=pytest.mark.settings(**settings))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        _case({"callback_secret": SECRET}, "http://127.0.0.1:9/hook", "private"),
        _case({"callback_secret": SECRET}, "http://[::1]:9/hook", "private"),
        _case({"callback_secret": SECRET}, "http://10.1.2.3/hook", "private"),
        _case({}, "http://93.184.216.34/hook", "callback_secret"),
        _case({"callback_secret": SECRET}, "ftp://example.com/hook", "http(s)"),
        _case({"callback_secret": SECRET}, "not a url", "http(s)"),
        _case({"callback_secret": SECRET}, "http://" + "a" * 2050, "2048"),
    ],
)
async def test_refused_at_submit(jobs_app: JobsApp, url: str, message: str) -> None:
    body = {"input_data": {"text": "a"}, "callback_url": url}
    r = await jobs_app.client.post("/api/v1/infer/echo/async", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "$.callback_url" and message in r.json()["error"]["message"]
    assert (await jobs_app.client.get("/api/v1/jobs")).json()["total"] == 0
