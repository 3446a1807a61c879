"""With log_format json, everything the supervisor writes to stderr is one JSON object a line:
structlog events, stdlib logging of libraries, Python warnings, asyncio's never-retrieved task
exceptions and uncaught exceptions (run in a fresh interpreter: logging set-up is per process)."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import asyncio, gc, logging, warnings
import structlog
from modelmora.logs import configure_logging

configure_logging("info", "json")
structlog.get_logger("modelmora.test").info("hello", n=1)
logging.getLogger("somelibrary").warning("a library speaks\\non two lines")
warnings.warn("something is deprecated", DeprecationWarning, stacklevel=1)

async def fails():
    raise RuntimeError("nobody awaits me")

async def main():
    task = asyncio.get_running_loop().create_task(fails())
    await asyncio.sleep(0.01)
    del task
    gc.collect()

asyncio.run(main())
raise SystemError("uncaught")
"""


def test_every_stderr_line_is_json_with_log_format_json() -> None:
    proc = subprocess.run([sys.executable, "-W", "always", "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    text = " ".join(str(e.get("event")) for e in events)
    assert "hello" in text and "a library speaks" in text and "something is deprecated" in text
    assert "Task exception was never retrieved" in text
    assert any(e.get("event") == "uncaught_exception" and "SystemError" in e.get("exception", "") for e in events)
