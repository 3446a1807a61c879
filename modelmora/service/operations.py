"""Background operations: long registry work (installing from a source) started by a front end,
run by the server, polled by the client (`GET /api/v1/operations/{id}`).

Operations live in memory for `KEEP_S` after they end (the jobs store will keep them durably);
they run in the service's task group (`InferenceService.run`), the blocking part in a worker
thread, and a shutdown abandons what is still running (the install's staging folder is removed on
the next one's start, never registered half-done).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.to_thread
import msgspec
import structlog

from ..errors import ModelMoraError, ModelUnavailable, OperationNotFound

__all__ = ("KEEP_S", "Operation", "OperationError", "Operations")

log = structlog.get_logger("modelmora.service")

KEEP_S = 3600.0
"""How long a finished operation can still be read."""

Status = Literal["pending", "running", "succeeded", "failed"]


class OperationError(msgspec.Struct, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class Operation(msgspec.Struct, omit_defaults=True):
    """A background operation and how far it got."""

    id: str
    kind: str
    """"install": register a model version from a source."""
    status: Status
    model_id: str
    created_at: float
    version: str | None = None
    done_bytes: int = 0
    total_bytes: int = 0
    finished_at: float | None = None
    error: OperationError | None = None
    """Why it failed (the same code and message as the synchronous error would have)."""


class Operations:
    """The table of operations and the task group that runs them."""

    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the running operations until cancelled (started by `InferenceService.run`)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    def start(
        self,
        kind: str,
        model_id: str,
        version: str | None,
        work: Callable[[Callable[[int, int], None]], Any],
    ) -> Operation:
        """Start `work(progress)` in a worker thread; the operation, pending.

        Raises:
            ModelUnavailable: the server is not running its background tasks (starting or stopping).
        """
        if self._tg is None:
            raise ModelUnavailable("background operations are not accepted now (the server is starting or stopping)")
        self._forget_old()
        op = Operation(uuid.uuid4().hex, kind, "pending", model_id, time.time(), version)
        self._ops[op.id] = op
        self._tg.start_soon(self._run, op, work, name=f"operation {op.id}")
        return op

    async def _run(self, op: Operation, work: Callable[[Callable[[int, int], None]], Any]) -> None:
        def progress(done: int, total: int) -> None:
            op.done_bytes, op.total_bytes = done, total

        op.status = "running"
        try:
            await anyio.to_thread.run_sync(lambda: work(progress), abandon_on_cancel=True)
        except ModelMoraError as exc:
            op.status = "failed"
            op.error = OperationError(exc.code, exc.message, exc.field)
        except Exception as exc:
            log.error("operation_failed", operation=op.id, kind=op.kind, exc_info=exc)
            op.status = "failed"
            op.error = OperationError("internal_error", f"the operation failed unexpectedly (operation {op.id})")
        else:
            op.status = "succeeded"
        finally:
            op.finished_at = time.time()
            log.info("operation_ended", operation=op.id, kind=op.kind, model=op.model_id, status=op.status)

    def get(self, op_id: str) -> Operation:
        """Raises: OperationNotFound (404): no such operation, or it ended more than `KEEP_S` ago."""
        self._forget_old()
        op = self._ops.get(op_id)
        if op is None:
            raise OperationNotFound(f"no operation {op_id!r} (finished ones are kept {KEEP_S:g} s)")
        return op

    def _forget_old(self) -> None:
        now = time.time()
        for op_id in [i for i, o in self._ops.items() if o.finished_at is not None and now - o.finished_at > KEEP_S]:
            del self._ops[op_id]
