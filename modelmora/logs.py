"""structlog set-up: key/value events on stderr, one JSON object a line with `log_format = "json"`.

Everything else that writes to stderr goes through the same renderer: the standard library's
logging (libraries, asyncio's "Task exception was never retrieved"), Python warnings, and
uncaught exceptions in the main thread and in other threads. Workers learn the format from
`MODELMORA_LOG_FORMAT` in their environment (see `modelmora_workers.logline`).
"""

from __future__ import annotations

import logging
import sys
import threading
from types import TracebackType

import structlog

__all__ = ("configure_logging",)


def configure_logging(level: str = "info", fmt: str = "console") -> None:
    """Configure structlog (and stdlib logging, warnings and uncaught exceptions) once per process."""
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
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
