"""`mm` against a running server: `status`, `health`, `load`, `unload`, and the registry commands
with `--url` (list, info, activate, uninstall, install). One HTTP client, errors as one line."""

from __future__ import annotations

import os
import ssl
import time
from pathlib import Path
from typing import Annotated, Any

import cyclopts
import httpx
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table

from .cli_base import CommandFailed, console, err_console, print_json, print_table, settings_for

__all__ = ("Remote", "health", "load", "remote_install", "server_url", "status", "unload")

UrlOption = Annotated[str | None, cyclopts.Parameter(name="--url")]


def server_url(url: str | None, config: Path | None, home: Path | None) -> str:
    """`--url`, else the configured server's address (a wildcard host asked at 127.0.0.1)."""
    if url:
        return url.rstrip("/")
    s = settings_for(config, home)
    host = "127.0.0.1" if s.host in ("0.0.0.0", "", "::") else s.host
    return f"http://{f'[{host}]' if ':' in host else host}:{s.port}"


class Remote:
    """A running server's REST API; every failure is `CommandFailed` with one line.

    The environment gives the credentials: `MODELMORA_TOKEN` (sent as a bearer token, never
    printed), `MODELMORA_CA_FILE` (the CA that signed an https server's certificate; else the
    system's), `MODELMORA_CLIENT_CERT` + `MODELMORA_CLIENT_KEY` (mutual TLS).
    """

    def __init__(self, url: str, timeout_s: float = 600.0) -> None:
        self.url = url
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
        token = os.environ.get("MODELMORA_TOKEN")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._verify: ssl.SSLContext | bool = True
        ca, cert = os.environ.get("MODELMORA_CA_FILE"), os.environ.get("MODELMORA_CLIENT_CERT")
        if ca or cert:
            try:
                context = ssl.create_default_context(cafile=ca or None)
                if cert:
                    context.load_cert_chain(cert, os.environ.get("MODELMORA_CLIENT_KEY") or None)
            except (OSError, ssl.SSLError) as exc:
                raise CommandFailed(
                    f"cannot read the TLS files (MODELMORA_CA_FILE / MODELMORA_CLIENT_CERT): {exc}"
                ) from None
            self._verify = context

    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 202), **kwargs: Any) -> Any:
        try:
            with httpx.Client(
                base_url=self.url, timeout=self.timeout, headers=self._headers, verify=self._verify
            ) as client:
                r = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CommandFailed(f"cannot reach the server at {self.url}: {type(exc).__name__}: {exc}") from None
        if r.status_code in ok:
            return r.json() if r.content else None
        try:
            err = r.json()["error"]
            where = f" ({err['field']})" if err.get("field") else ""
            message = f"{err['message']}{where} [HTTP {r.status_code} {err['code']}]"
        except (ValueError, KeyError, TypeError):
            message = f"the server answered HTTP {r.status_code}"
        raise CommandFailed(message)


def _ref(model: str) -> tuple[str, str | None]:
    from .registry import split_ref

    return split_ref(model)


def status(
    *, url: UrlOption = None, json_: Annotated[bool, cyclopts.Parameter(name="--json")] = False,
    config: Path | None = None, home: Path | None = None,
) -> None:  # fmt: skip
    """Ask a running server what runs: every model version's state, worker, memory, queue.

    Parameters
    ----------
    url
        The server (default: the configured host and port).
    json_
        Print the whole status as JSON.
    """
    body = Remote(server_url(url, config, home)).call("GET", "/api/v1/status")
    if json_:
        print_json(body)
        return
    table = Table("model", "version", "state", "pid", "memory", "queue", "served", "last error")
    for m in body["models"]:
        worker = m.get("worker") or {}
        mem = f"{m['measured_mb']:.0f} MiB" if m.get("measured_mb") else ""
        table.add_row(m["model_id"], m["version"], m["state"], str(worker.get("pid", "")), mem,
                      str(m["queue_depth"]), str(m["served"]), m.get("last_error") or "")  # fmt: skip
    print_table(table)
    budget = body.get("budget") or {}
    total = budget.get("memory_budget_mb")
    limit = f"{total:.0f} MiB" if total else "no limit"
    console.print(f"memory: {budget.get('used_mb', 0):.0f} MiB used by workers ({limit})", highlight=False)


def health(
    *, url: UrlOption = None, json_: Annotated[bool, cyclopts.Parameter(name="--json")] = False,
    config: Path | None = None, home: Path | None = None,
) -> None:  # fmt: skip
    """Ask a running server whether it is healthy: ready to serve, and every model healthy. The exit
    status is 0 when it is, 1 when not (or when it cannot be reached).

    Parameters
    ----------
    url
        The server (default: the configured host and port).
    json_
        Print {"ready", "reason", "models"} as JSON.
    """
    remote = Remote(server_url(url, config, home), timeout_s=30.0)
    ready = remote.call("GET", "/health/ready", ok=(200, 503))
    models = remote.call("GET", "/health/models", ok=(200, 503))["models"]
    bad = [m for m in models if not m["healthy"]]
    if json_:
        print_json({"ready": ready["status"] == "ok", "reason": ready.get("reason"), "models": models})
    else:
        table = Table("model", "version", "healthy", "state", "reason")
        for m in models:
            table.add_row(
                m["model_id"], m["version"], "yes" if m["healthy"] else "NO", m["state"], m.get("reason") or ""
            )
        if models:
            print_table(table)
        console.print(f"server {remote.url}: {'ready' if ready['status'] == 'ok' else 'not ready'}", highlight=False)
    if ready["status"] != "ok":
        raise CommandFailed(f"the server is not ready: {ready.get('reason')}")
    if bad:
        names = ", ".join(f"{m['model_id']}@{m['version']}" for m in bad)
        raise CommandFailed(f"unhealthy: {names}")


def load(model: str, *, url: UrlOption = None, config: Path | None = None, home: Path | None = None) -> None:
    """Ask a running server to load a model (ID or ID@VERSION) and run its test inference now.

    Parameters
    ----------
    model
        ID, or ID@VERSION.
    url
        The server (default: the configured host and port).
    """
    model_id, version = _ref(model)
    params = {"version": version} if version else {}
    body = Remote(server_url(url, config, home)).call("POST", f"/api/v1/models/{model_id}/load", params=params)
    pid = (body.get("worker") or {}).get("pid")
    console.print(f"{model_id}@{body['version']}: {body['state']}" + (f" (worker {pid})" if pid else ""))


def unload(model: str, *, url: UrlOption = None, config: Path | None = None, home: Path | None = None) -> None:
    """Ask a running server to unload a model (ID or ID@VERSION): its queue is served, its worker stops.

    Parameters
    ----------
    model
        ID, or ID@VERSION.
    url
        The server (default: the configured host and port).
    """
    model_id, version = _ref(model)
    params = {"version": version} if version else {}
    body = Remote(server_url(url, config, home)).call("POST", f"/api/v1/models/{model_id}/unload", params=params)
    console.print(f"{model_id}@{body['version']}: {body['state']}")


def remote_install(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """`mm install --url`: register over REST and follow the operation with a progress bar."""
    remote = Remote(url)
    op = remote.call("POST", "/api/v1/models", json={k: v for k, v in body.items() if v is not None})
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), console=err_console,
                        disable=not err_console.is_terminal)  # fmt: skip
    bar = progress.add_task(f"{op['model_id']} on the server", total=None)
    with progress:
        while op["status"] in ("pending", "running"):
            time.sleep(0.2)
            op = remote.call("GET", f"/api/v1/operations/{op['id']}")
            progress.update(bar, completed=op.get("done_bytes", 0), total=op.get("total_bytes") or None)
    if op["status"] != "succeeded":
        err = op.get("error") or {}
        raise CommandFailed(f"{err.get('message', 'the install failed')} [{err.get('code', 'failed')}]")
    return dict(remote.call("GET", f"/api/v1/models/{op['model_id']}"))
