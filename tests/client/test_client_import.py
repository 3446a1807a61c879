"""A client-only install: importing `modelmora.client` loads the client's own dependencies
(grpclib, betterproto2, numpy and theirs) and the generated messages, never the server or torch."""

from __future__ import annotations

import json
import subprocess
import sys

SERVER_SIDE = {
    "torch",
    "transformers",
    "sentence_transformers",
    "diffusers",
    "starlette",
    "hypercorn",
    "anyio",
    "trio",
    "msgspec",
    "structlog",
    "httpx",
    "PIL",
    "psutil",
    "cyclopts",
    "aiobotocore",
    "huggingface_hub",
    "uvloop",
}
CLIENT_SIDE = {
    "modelmora",
    "grpclib",
    "h2",
    "hpack",
    "hyperframe",
    "multidict",
    "betterproto2",
    "dateutil",
    "typing_extensions",
    "numpy",
    # betterproto2 imports pydantic when it is installed (not a requirement of the client)
    "pydantic",
    "pydantic_core",
    "typing_inspection",
    "annotated_types",
}


def test_importing_the_client_loads_neither_the_server_nor_torch() -> None:
    code = "import json, sys, modelmora.client; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    modules = set(json.loads(proc.stdout))
    top = {m.split(".")[0] for m in modules}
    assert not top & SERVER_SIDE
    ours = sorted(m for m in modules if m.startswith("modelmora."))
    assert all(m.startswith(("modelmora.client", "modelmora._proto")) for m in ours), ours
    tooling = {"coverage", "$coverage"}  # subprocess coverage, when the suite runs under it
    third_party = {m for m in top - set(sys.stdlib_module_names) - tooling if not m.startswith("_")}
    assert third_party <= CLIENT_SIDE, third_party - CLIENT_SIDE
    assert {"grpclib", "betterproto2", "numpy"} <= top
