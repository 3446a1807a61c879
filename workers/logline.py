"""How the zygote and workers write their lines to stderr, in the shape of the supervisor's own
(structlog's): one JSON object a line when the server logs JSON (`MODELMORA_LOG_FORMAT=json` in
the environment the server gives them), else `timestamp [level] event key=value...`. Every line
is tagged with the process's role ("worker", "zygote") and pid, and, once a worker knows its
model, with the model and version (`bind`). Lines below `MODELMORA_LOG_LEVEL` are not written.
`configure()` routes the standard library's logging and Python warnings the same way (libraries'
warnings would otherwise be bare text)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

__all__ = ("bind", "configure", "enabled", "json_format", "write")

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_context: dict[str, Any] = {}


def json_format() -> bool:
    return os.environ.get("MODELMORA_LOG_FORMAT", "").lower() == "json"


def enabled(level: str) -> bool:
    """Whether lines of `level` are written (`MODELMORA_LOG_LEVEL`, default info)."""
    return _LEVELS.get(level, 20) >= _LEVELS.get(os.environ.get("MODELMORA_LOG_LEVEL", "info").lower(), 20)


def bind(**fields: Any) -> None:
    """Add `fields` (e.g. model, version) to every later line of this process."""
    _context.update(fields)


def _timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def _text_value(value: Any) -> str:
    """A field for the text format; one with line breaks (a traceback) is quoted, so the event stays one line."""
    text = str(value)
    return json.dumps(text) if "\n" in text or "\r" in text else text


def write(role: str, event: str, *, level: str = "info", **fields: Any) -> None:
    """One line on stderr from this process (`role`: "worker" or "zygote"); `level` as in logging
    ("debug", "info", "warning", "error"); nothing when `level` is below `MODELMORA_LOG_LEVEL`."""
    if not enabled(level):
        return
    record = {**_context, **fields, "role": role, "pid": os.getpid()}
    if json_format():
        line = json.dumps({"event": event, **record, "level": level, "timestamp": _timestamp()}, default=str)
    else:
        kv = " ".join(f"{k}={_text_value(v)}" for k, v in sorted(record.items()))
        line = f"{_timestamp()} [{level:<9}] {event:<30} {kv}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "event": record.getMessage(),
            "logger": record.name,
            **_context,
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
