"""`/docs` renders the OpenAPI 3.1 document offline, checked in a real headless Chromium.

The browser test starts `mm serve` as a subprocess, opens `/docs` in Chromium whose only route out
is a refused proxy (loopback goes direct), and drives it over the DevTools protocol on a pipe: that
sees exactly the page's own requests (Chromium's background traffic, which `--dump-dom` cannot tell
apart, is not the page's), console errors and policy violations, and the rendered DOM.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from modelmora.api import openapi

from serverproc import ServerProcess

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def document_operations() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in openapi.document()["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


# ---------------------------------------------------------------- the page as served (no browser)


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.csp: str | None = None
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.refs += [v for k, v in a.items() if k in ("src", "href") and v is not None]
        if tag == "meta" and (a.get("http-equiv") or "").lower() == "content-security-policy":
            self.csp = a.get("content")
        if tag == "script" and "src" not in a:
            self.inline_scripts += 1


def test_docs_page_loads_only_assets_of_this_server() -> None:
    page = _Refs()
    page.feed(openapi.DOCS_HTML)
    assert page.refs, "the page loads its viewer from somewhere"
    for ref in page.refs:
        assert ref.startswith("/docs/assets/"), ref  # a path on this server: no scheme, no other host
        assert (Path(openapi.swagger_assets_dir()) / ref.removeprefix("/docs/assets/")).is_file(), ref
    assert page.csp is not None
    directives = dict(d.strip().split(" ", 1) for d in page.csp.split(";"))
    assert directives["default-src"] == "'self'" and directives["connect-src"] == "'self'"
    assert "'unsafe-inline'" not in directives["script-src"] and page.inline_scripts == 1
    assert "validatorUrl: null" in openapi.DOCS_HTML  # Swagger UI's default validator is another host


def test_bundled_viewer_is_swagger_ui_5() -> None:
    """Swagger UI reads OpenAPI 3.1 from 5.0 on (4.x shows "Unable to render this definition")."""
    head = (Path(openapi.swagger_assets_dir()) / "swagger-ui-bundle.js").read_text(errors="replace")
    m = re.search(r'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', head)
    assert m is not None and int(m.group(1)) >= 5, m


# ---------------------------------------------------------------- the page in a real browser


def chromium_binary() -> str:
    """Chromium (Debian's `chromium`); skipped when absent unless MODELMORA_REQUIRE_SERVICES=1."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    reason = "Chromium not found (Debian: apt-get install -y chromium)"
    if os.environ.get("MODELMORA_REQUIRE_SERVICES") == "1":
        pytest.fail(reason + "; MODELMORA_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(reason)


class DevTools:
    """Headless Chromium driven over `--remote-debugging-pipe` (NUL-terminated JSON on fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path, blocked_proxy_port: int) -> None:
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # numbered above 4, so that placing them on 3 and 4 in the child cannot overwrite one another
        child_r = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD_CLOEXEC, 5)
        child_w = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD_CLOEXEC, 5)
        os.close(to_browser_r)
        os.close(from_browser_w)

        def on_fds_3_and_4() -> None:
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.log = profile.with_suffix(".log")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    # the network is restricted: everything but loopback goes to a port that refuses
                    f"--proxy-server=http://127.0.0.1:{blocked_proxy_port}",
                    "--remote-debugging-pipe",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(3, 4),
                preexec_fn=on_fds_3_and_4,
            )
        os.close(child_r)
        os.close(child_w)
        self._out = to_browser_w
        self._in = from_browser_r
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._in], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"Chromium did not answer in time:\n{self.log.read_text(errors='replace')}")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise AssertionError(f"Chromium closed the pipe:\n{self.log.read_text(errors='replace')}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") != self._next_id:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise AssertionError(f"{method}: {answer['error']}")
            return answer.get("result", {})

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        finally:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            os.close(self._out)
            os.close(self._in)


@dataclass
class RenderedDocs:
    origin: str
    operations: list[tuple[str, str]]
    text: str
    requests: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


_OPERATIONS_JS = """JSON.stringify([...document.querySelectorAll('.opblock')].map(b => [
  b.querySelector('.opblock-summary-method')?.textContent,
  b.querySelector('.opblock-summary-path')?.dataset.path]))"""


def _evaluate(browser: DevTools, session: str, expression: str) -> Any:
    result = browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    return result["result"].get("value")


def render_docs(binary: str, url: str, profile: Path) -> RenderedDocs:
    with socket.socket() as blocked:  # bound, never listening: connections to it are refused
        blocked.bind(("127.0.0.1", 0))
        browser = DevTools(binary, profile, blocked.getsockname()[1])
        try:
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Network", "Page", "Runtime", "Log"):
                browser.call(f"{domain}.enable", session=session)
            browser.call("Page.navigate", {"url": url}, session)
            expected = len(document_operations())
            deadline = time.monotonic() + 120  # a wait limit for a slow machine, not a speed check
            while time.monotonic() < deadline:
                found = _evaluate(browser, session, "document.querySelectorAll('.opblock').length")
                broken = _evaluate(browser, session, "document.body?.innerText.includes('Unable to render')")
                if broken or (found or 0) >= expected:
                    break
                time.sleep(0.2)
            time.sleep(1)  # let late requests start (the events arrive with the next answers)
            operations = [tuple(op) for op in json.loads(_evaluate(browser, session, _OPERATIONS_JS))]
            text = _evaluate(browser, session, "document.body.innerText")
        finally:
            browser.close()
    page = [e for e in browser.events if e.get("sessionId") == session]
    parts = urlsplit(url)
    out = RenderedDocs(f"{parts.scheme}://{parts.netloc}", operations, text)
    for e in page:
        params = e.get("params", {})
        if e.get("method") == "Network.requestWillBeSent":
            out.requests.append(params["request"]["url"])
        elif e.get("method") == "Network.loadingFailed":
            out.failed.append(params)
        elif e.get("method") == "Runtime.exceptionThrown":
            out.errors.append(json.dumps(params["exceptionDetails"])[:2000])
        elif e.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
            out.errors.append(json.dumps(params.get("args"))[:2000])
        elif e.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            out.errors.append(f"{params['entry'].get('source')}: {params['entry'].get('text')}")
    return out


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RenderedDocs]:
    binary = chromium_binary()
    server = ServerProcess(tmp_path_factory.mktemp("docs-home")).start()
    try:
        yield render_docs(binary, f"{server.url}/docs", tmp_path_factory.mktemp("chromium") / "profile")
    finally:
        assert server.stop() == 0


def test_docs_lists_every_operation_of_the_openapi_31_document(rendered: RenderedDocs) -> None:
    assert "Unable to render" not in rendered.text, rendered.text[:2000]
    assert sorted(rendered.operations) == sorted(document_operations()), rendered.text[:2000]
    for path in ("/api/v1/infer/{model_id}", "/api/v1/models/{model_id}/load", "/health/ready"):
        assert path in rendered.text
    assert "ModelMora" in rendered.text and "OAS 3.1" in rendered.text


def test_docs_page_sends_no_request_beyond_the_server(rendered: RenderedDocs) -> None:
    assert f"{rendered.origin}/openapi.json" in rendered.requests  # the page was seen loading the document
    elsewhere = [
        u
        for u in rendered.requests
        if urlsplit(u).scheme not in ("data", "blob") and not u.startswith(rendered.origin + "/")
    ]
    assert elsewhere == []
    assert rendered.failed == []
    assert rendered.errors == []
