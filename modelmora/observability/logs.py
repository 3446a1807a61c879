"""structlog set-up: key/value events on stderr; one JSON object a line with `log_format = "json"`,
or with "auto" (the default) whenever stderr is not a terminal.

Everything else that writes to stderr goes through the same renderer: the standard library's
logging (libraries, asyncio's "Task exception was never retrieved"), Python warnings, and
uncaught exceptions in the main thread and in other threads. Every event logged while a request
is served carries its `trace_id` (`tracing.current_trace`). Workers learn the format and level
from `MODELMORA_LOG_FORMAT` / `MODELMORA_LOG_LEVEL` in their environment (`worker_log_env`; see
`modelmora_workers.logline`) and write their lines in the same shape, tagged with role, model and pid.
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType

import structlog

from .tracing import add_trace_id

__all__ = ("configure_logging", "debug_enabled", "effective_format", "worker_log_env")

_debug = False


def debug_enabled() -> bool:
    """Whether debug events are written (check it before building a debug event's fields on a hot path)."""
    return _debug


def effective_format(fmt: str) -> str:
    """ "json" or "console": "auto" is JSON unless stderr is a terminal."""
    if fmt == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        return "console" if isatty is not None and isatty() else "json"
    return fmt


def worker_log_env(level: str, fmt: str) -> dict[str, str]:
    """The environment variables that make the zygote and workers log as this process does."""
    return {"MODELMORA_LOG_LEVEL": level.lower(), "MODELMORA_LOG_FORMAT": effective_format(fmt)}


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog (and stdlib logging, warnings and uncaught exceptions) once per process.

    Args:
        level: the lowest level written ("debug": also every request completed).
        fmt: "console", "json", or "auto" (JSON unless stderr is a terminal).
    """
    global _debug
    fmt = effective_format(fmt)
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    _debug = lvl <= logging.DEBUG
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_id,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(lvl, logging.WARNING))
    logging.captureWarnings(True)
    if fmt == "json":
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    structlog.get_logger("modelmora").critical("uncaught_exception", exc_info=(kind, value, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    structlog.get_logger("modelmora").error(
        "uncaught_exception_in_thread",
        thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )
