"""`Client`: the `AsyncClient`'s methods as blocking calls, for scripts, notebooks and threads.

    with Client("127.0.0.1:50051") as mm:
        vectors = mm.embed("all-MiniLM-L6-v2", ["hello", "world"])
        for event in mm.generate_stream("gpt2", "Once upon a time"):
            ...

The client runs its own asyncio event loop on a thread of its own, so it works whether or not the
calling thread has a loop running (Jupyter's does), from any number of threads at once. `close()`
(or leaving the `with` block) closes the connection and ends the thread. Ctrl-C during a call
cancels it. A streaming method returns an iterator; leaving it early stops the call on the server.
`infer_stream` iterates its requests on the client's thread: pass a list, or a generator that does
not block.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from ssl import SSLContext
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar

from .aio import DEFAULT_TARGET, AsyncClient
from .retry import RetryPolicy

__all__ = ("Client",)

P = ParamSpec("P")
T = TypeVar("T")


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    """End the loop's thread (a client dropped without `close()`; also at interpreter exit)."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _next(items: AsyncIterator[T]) -> T:
    return await items.__anext__()


async def _shutdown(client: AsyncClient) -> None:
    """Close the connection, then end what is left on the loop (streams dropped unfinished)."""
    await client.close()
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


def _blocking(
    method: Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Client, P], T]:
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        self._check_open()
        return self._run(method(self._async, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


def _blocking_stream(
    method: Callable[Concatenate[AsyncClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[Client, P], Iterator[T]]:
    def call(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        self._check_open()
        return self._iterate(method(self._async, *args, **kwargs))

    functools.update_wrapper(call, method)
    return call


class Client:
    """ModelMora's gRPC API as blocking calls: the same methods, arguments and results as
    `AsyncClient` (see it for the options)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        metadata: Mapping[str, str] | None = None,
        ssl: bool | SSLContext = False,
        token: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        self._async = AsyncClient(
            target,
            timeout=timeout,
            retry=retry,
            metadata=metadata,
            ssl=ssl,
            token=token,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_serve, args=(self._loop,), name="modelmora-client", daemon=True)
        self._thread.start()
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop, self._loop, self._thread)

    @property
    def target(self) -> str:
        return self._async.target

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("a blocking Client method was called from the client's own event loop")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C while waiting: cancel the call (a no-op once it is done)
            future.cancel()
            raise

    def _iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    item = self._run(_next(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._closed and threading.current_thread() is not self._thread and hasattr(items, "aclose"):
                self._run(items.aclose())

    def close(self) -> None:
        """Close the connection and end the client's thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(_shutdown(self._async))
        finally:
            self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    embed = _blocking(AsyncClient.embed)
    generate = _blocking(AsyncClient.generate)
    generate_stream = _blocking_stream(AsyncClient.generate_stream)
    caption = _blocking(AsyncClient.caption)
    generate_image = _blocking(AsyncClient.generate_image)
    generate_image_stream = _blocking_stream(AsyncClient.generate_image_stream)
    models = _blocking(AsyncClient.models)
    model = _blocking(AsyncClient.model)
    update_settings = _blocking(AsyncClient.update_settings)
    delete_model = _blocking(AsyncClient.delete_model)
    infer_stream = _blocking_stream(AsyncClient.infer_stream)
    status = _blocking(AsyncClient.status)
    load = _blocking(AsyncClient.load)
    unload = _blocking(AsyncClient.unload)
    submit = _blocking(AsyncClient.submit)
    job = _blocking(AsyncClient.job)
    cancel = _blocking(AsyncClient.cancel)
    wait = _blocking(AsyncClient.wait)
    watch = _blocking_stream(AsyncClient.watch)
    job_result = _blocking(AsyncClient.job_result)
