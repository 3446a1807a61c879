"""How the zygote and workers write their few lines to stderr: `[worker PID] event k=v` by
default, one JSON object a line when the server logs JSON (`MODELMORA_LOG_FORMAT=json` in the
environment the server gives them). `configure()` routes the standard library's logging and
Python warnings the same way (libraries' warnings would otherwise be bare text)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

__all__ = ("configure", "json_format", "write")


def json_format() -> bool:
    return os.environ.get("MODELMORA_LOG_FORMAT", "").lower() == "json"


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def _text_value(value: Any) -> str:
    """A field for the text format; one with line breaks (a traceback) is quoted, so the event stays one line."""
    text = str(value)
    return json.dumps(text) if "\n" in text or "\r" in text else text


def write(role: str, event: str, *, level: str = "info", **fields: Any) -> None:
    """One line on stderr from this process (`role`: "worker" or "zygote"); `level` as in logging
    ("info", "warning", "error"), shown by the JSON format."""
    if json_format():
        record = {"event": event, "role": role, "pid": os.getpid(), **fields}
        line = json.dumps({**record, "level": level, "timestamp": _timestamp()}, default=str)
    else:
        kv = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        line = f"[{role} {os.getpid()}] {event} {kv}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "event": record.getMessage(),
            "logger": record.name,
            "level": record.levelname.lower(),
            "pid": os.getpid(),
            "timestamp": _timestamp(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure() -> None:
    """With JSON logging: stdlib logging and warnings as JSON lines on stderr (else nothing changes)."""
    if not json_format():
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
