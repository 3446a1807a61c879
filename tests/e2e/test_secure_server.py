"""`mm serve` with mutual TLS and tokens, as an operator runs it (Echo pipeline, no torch): REST over
HTTPS with HTTP/2 by ALPN, gRPC over TLS through grpclib and through a grpcio client (its own
process), the client certificate required, tokens checked on both, certificates rotated on SIGHUP
for new connections, the audit trail in the log and no token anywhere in it; and the warning for a
non-loopback address served in cleartext without authentication."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from modelmora._proto.modelmora import v1

from conftest import ECHO_LAYOUT, TESTS_DIR
from serverproc import ServerProcess, mm
from tlsfiles import TlsFiles, peer_common_name

pytestmark = [pytest.mark.slow, pytest.mark.anyio]  # real server processes

INFER_TOKEN = "e2e-infer-token-1111111111"
ADMIN_TOKEN = "e2e-admin-token-2222222222"
WRONG_TOKEN = "e2e-wrong-token-3333333333"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _env(**extra: str) -> dict[str, str]:
    return {
        "MODELMORA_PIPELINES__TXT2EMBED": "worker_pipelines:Echo",
        "MODELMORA_ZYGOTE": "false",
        "MODELMORA_ZYGOTE_PRELOAD": "numpy",
        "MODELMORA_TORCH_THREADS": "1",
        "MODELMORA_LOG_LEVEL": "debug",
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        **extra,
    }


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tls: TlsFiles) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("secure-home")
    echo = home / "echo-src"
    echo.mkdir()
    (echo / "weights.bin").write_bytes(b"\0" * 16)
    for name in ECHO_LAYOUT:
        (echo / name).write_text("{}")
    mm("install", str(echo), "--id", "echo", "--task", "txt2embed", home=home)
    tokens = home / "tokens"
    tokens.write_text(f"# who may do what\napp infer {INFER_TOKEN}\nops admin,read {ADMIN_TOKEN}\n")
    env = _env(**tls.env(mutual=True), MODELMORA_AUTH__TOKENS_FILE=str(tokens))
    srv = ServerProcess(home, env, verify=tls.client_context(client_cert=True)).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_rest_over_https_negotiates_http2_and_checks_tokens(server: ServerProcess, tls: TlsFiles) -> None:
    async with httpx.AsyncClient(http2=True, verify=tls.client_context(client_cert=True), timeout=60) as client:
        body = {"input_data": {"text": "hello"}}
        r = await client.post(f"{server.url}/api/v1/infer/echo", json=body, headers=bearer(INFER_TOKEN))
        assert r.status_code == 200 and r.http_version == "HTTP/2"
        assert r.extensions["network_stream"].get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        r = await client.post(f"{server.url}/api/v1/infer/echo", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="modelmora"'
        for action in ("load", "unload"):
            r = await client.post(f"{server.url}/api/v1/models/echo/{action}", headers=bearer(ADMIN_TOKEN))
            assert r.status_code == 200, r.text
    async with httpx.AsyncClient(verify=tls.client_context()) as no_cert:  # mutual TLS: refused
        with pytest.raises(httpx.TransportError):
            await no_cert.get(f"{server.url}/health/live")


async def test_grpc_over_tls_with_grpclib(server: ServerProcess, tls: TlsFiles) -> None:
    channel = Channel("127.0.0.1", server.grpc_port, ssl=tls.client_context(alpn=("h2",), client_cert=True))
    try:
        stub = v1.InferenceServiceStub(channel)
        reply = await stub.infer(v1.InferRequest(model_id="echo", texts=["hi"]), metadata=bearer(INFER_TOKEN))
        assert tuple(reply.embeddings.shape) == (1, 4)
        with pytest.raises(GRPCError) as err:
            await stub.infer(v1.InferRequest(model_id="echo", texts=["hi"]), metadata=bearer(WRONG_TOKEN))
        assert err.value.status == Status.UNAUTHENTICATED
    finally:
        channel.close()
    without = Channel("127.0.0.1", server.grpc_port, ssl=tls.client_context(alpn=("h2",)))
    try:
        with pytest.raises((OSError, StreamTerminatedError)), anyio.fail_after(60):
            await v1.InferenceServiceStub(without).infer(v1.InferRequest(model_id="echo", texts=["hi"]))
    finally:
        without.close()


GRPCIO_TLS_CLIENT = """
import json, sys
import grpc
from modelmora.v1 import inference_pb2 as pb, inference_pb2_grpc as rpc

port, ca, cert, key, token = sys.argv[1:6]
read = lambda p: open(p, "rb").read()

def channel(with_cert):
    creds = grpc.ssl_channel_credentials(read(ca), read(key) if with_cert else None, read(cert) if with_cert else None)
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)

out = {}
with channel(True) as ch:
    stub = rpc.InferenceServiceStub(ch)
    auth = [("authorization", "Bearer " + token)]
    r = stub.Infer(pb.InferRequest(model_id="echo", texts=["hello"]), metadata=auth, timeout=60)
    out["infer"] = list(r.embeddings.shape)
    for name, md in (("none", []), ("wrong", [("authorization", "Bearer wrong-token-00000000000")])):
        try:
            stub.Infer(pb.InferRequest(model_id="echo", texts=["x"]), metadata=md, timeout=30)
        except grpc.RpcError as e:
            out[name] = [e.code().name, dict(e.trailing_metadata()).get("modelmora-error-code")]
with channel(False) as ch:
    try:
        rpc.InferenceServiceStub(ch).Infer(pb.InferRequest(model_id="echo", texts=["x"]), timeout=30)
    except grpc.RpcError as e:
        out["no_cert"] = e.code().name
print(json.dumps(out))
"""


def grpcio_stubs(where: Path) -> None:
    schema = Path(__file__).resolve().parents[2] / "schema"
    protos = [str(p.relative_to(schema)) for p in sorted((schema / "modelmora" / "v1").glob("*.proto"))]
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{schema}", f"--python_out={where}"]
    subprocess.run([*command, f"--grpc_python_out={where}", *protos], check=True)
    for package in ("modelmora", "modelmora/v1"):
        (where / package / "__init__.py").touch()  # a regular package: it shadows ours in that process


async def test_grpc_over_tls_with_a_grpcio_client(server: ServerProcess, tls: TlsFiles, tmp_path: Path) -> None:
    grpcio_stubs(tmp_path)
    (tmp_path / "client.py").write_text(GRPCIO_TLS_CLIENT)
    cert, key = tls.client_cert("grpcio-client")
    args = [str(server.grpc_port), str(tls.ca_file), str(cert), str(key), INFER_TOKEN]
    proc = await anyio.run_process([sys.executable, str(tmp_path / "client.py"), *args], cwd=tmp_path)
    out = json.loads(proc.stdout)
    assert out["infer"] == [1, 4]
    assert out["none"] == ["UNAUTHENTICATED", "unauthenticated"]
    assert out["wrong"] == ["UNAUTHENTICATED", "unauthenticated"]
    assert out["no_cert"] == "UNAVAILABLE"


async def test_sighup_rotates_the_certificate_for_new_connections(server: ServerProcess, tls: TlsFiles) -> None:
    ctx = tls.client_context(client_cert=True)
    before = await anyio.to_thread.run_sync(peer_common_name, server.port, ctx)
    assert before == (tls.cert_name, "h2")
    async with httpx.AsyncClient(http2=True, verify=ctx, timeout=60) as kept:
        assert (await kept.get(f"{server.url}/health/live")).status_code == 200
        new = tls.rotate()
        os.kill(server.pid, signal.SIGHUP)
        with anyio.fail_after(60):  # a safety net: the reload follows the signal
            while True:
                if (await anyio.to_thread.run_sync(peer_common_name, server.port, ctx))[0] == new:
                    break
                await anyio.sleep(0.05)
        grpc_ctx = tls.client_context(alpn=("h2",), client_cert=True)
        assert (await anyio.to_thread.run_sync(peer_common_name, server.grpc_port, grpc_ctx))[0] == new
        assert (await kept.get(f"{server.url}/health/live")).status_code == 200  # the open connection goes on
    assert server.proc is not None and server.proc.poll() is None  # SIGHUP did not end the server


def test_the_log_holds_the_audit_trail_and_no_token(server: ServerProcess) -> None:
    """Runs last in this module: the log of everything above."""
    text = server.log.read_text()
    events = _events(text)
    audits = {e["action"] for e in events if e.get("event") == "audit" and e.get("by") == "ops"}
    assert {"load", "unload"} <= audits
    assert any(e.get("event") == "tls_reloaded" for e in events)
    assert any(e.get("why") == "SIGHUP" for e in events)
    for token in (INFER_TOKEN, ADMIN_TOKEN, WRONG_TOKEN, "wrong-token-00000000000"):
        assert token not in text


def test_cleartext_without_auth_on_a_public_address_warns(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "home", _env(MODELMORA_GRPC_PORT="0"), args=("--host", "0.0.0.0")).start()
    try:
        text = srv.log.read_text()
    finally:
        assert srv.stop() == 0
    assert any(e.get("event") == "insecure_bind" and e.get("host") == "0.0.0.0" for e in _events(text))


def _events(text: str) -> list[dict[str, Any]]:
    """The server's JSON log lines (the log is JSON when not on a terminal)."""
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if isinstance(event, dict):
                events.append(event)
    return events
