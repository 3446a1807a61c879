"""Servers sharing work through Redis Streams (`redis_url`), with redis-py's asyncio client:
asyncio only.

The job store stays the truth; Redis carries the news of queued jobs between the servers:
- each model has a stream, `<prefix>jobs:<model_id>`, read through the consumer group `runners`
  (the models that have one are the set `<prefix>models`);
- a submit appends the job's id once the job is committed (a failed append is only logged: the
  store's polling finds the job);
- a server reads at once the streams of the models it holds loaded, and the entries of any other
  stream once they waited `job_warm_wait_s` (so that a cluster does not cold-load a model on every
  server);
- an entry is acknowledged (and deleted) once its job's outcome is stored, or at once when the
  store says the job is not to run (finished, cancelled, running elsewhere, waiting for a retry);
- a server renews its entries as it renews its leases: the entries of a server that died stay
  pending, and once idle `job_lease_s` another server claims them (XAUTOCLAIM) and runs their
  jobs, whose leases in the store expired meanwhile.
"""

from __future__ import annotations

import builtins
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

__all__ = ("GROUP", "Entry", "RedisDispatch")

GROUP = "runners"
"""The consumer group every server reads the job streams through."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: the job it names, and where it is (to acknowledge it)."""

    model_id: str
    entry_id: str
    job_id: str


def _no_group(exc: ResponseError) -> bool:
    text = str(exc)
    return text.startswith("NOGROUP") or "no such key" in text


class RedisDispatch:
    """The job streams in one Redis (see the module's docstring).

    Args:
        url: `redis://` or `rediss://` URL.
        prefix: the start of every key (the servers sharing one job store share it).
        claim_idle_s: an entry pending this long without renewal is claimed by another server.
        consumer: this server's name in the group (default: host, pid and a random part).
    """

    def __init__(self, url: str, prefix: str, *, claim_idle_s: float, consumer: str | None = None) -> None:
        # a call fails fast while Redis is away (the runner polls the store meanwhile); a pooled
        # connection Redis closed (it restarted) is tried once more on a fresh one
        self.redis: Any = redis.asyncio.Redis.from_url(
            url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 1)
        )
        self.prefix = prefix
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self._groups: set[str] = set()

    def stream(self, model_id: str) -> str:
        return f"{self.prefix}jobs:{model_id}"

    async def _group(self, stream: str, *, again: bool = False) -> None:
        """Create the stream's group (from its first entry) unless this server did already."""
        if stream in self._groups and not again:
            return
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add(stream)

    async def ping(self) -> None:
        await self.redis.ping()

    async def publish(self, model_id: str, job_id: str) -> None:
        """Append a committed job to its model's stream."""
        stream = self.stream(model_id)
        await self._group(stream)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(f"{self.prefix}models", model_id)
            pipe.xadd(stream, {"job": job_id})
            await pipe.execute()

    async def take(self, count: int, warm: frozenset[str] | None, cold_after_s: float) -> builtins.list[Entry]:
        """Up to `count` entries for this server: pending ones of a server that died first, then
        new ones of the `warm` models' streams (None: every stream), then entries of the other
        streams that waited `cold_after_s`."""
        models = sorted(await self.redis.smembers(f"{self.prefix}models"))
        out: list[Entry] = []
        for model in models:
            if len(out) < count:
                out += await self._reclaim(model, count - len(out))
        ready = [m for m in models if warm is None or m in warm]
        for model in ready:
            if len(out) < count:
                out += await self._read(model, count - len(out))
        cutoff_ms = int((time.time() - cold_after_s) * 1000)
        for model in models:
            if len(out) < count and model not in ready:
                waited = await self._waited(model, cutoff_ms, count - len(out))
                if waited:
                    out += await self._read(model, waited)
        return out

    async def _reclaim(self, model: str, count: int) -> builtins.list[Entry]:
        stream = self.stream(model)
        try:
            reply = await self.redis.xautoclaim(stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=count)
        except ResponseError as exc:
            if not _no_group(exc):
                raise
            await self._group(stream, again=True)
            return []
        return await self._entries(model, reply[1])

    async def _read(self, model: str, count: int) -> builtins.list[Entry]:
        stream = self.stream(model)
        try:
            reply = await self.redis.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=count)
        except ResponseError as exc:
            if not _no_group(exc):
                raise
            await self._group(stream, again=True)
            return []
        entries: list[Entry] = []
        for _, items in reply or []:
            entries += await self._entries(model, items)
        return entries

    async def _waited(self, model: str, cutoff_ms: int, count: int) -> int:
        """How many of the stream's entries not yet delivered were added before `cutoff_ms` (at most `count`)."""
        stream = self.stream(model)
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError as exc:
            if not _no_group(exc):
                raise
            return 0
        last = next((g["last-delivered-id"] for g in groups if g["name"] == GROUP), None)
        if last is None:
            await self._group(stream, again=True)
            last = "0-0"
        if cutoff_ms <= 0:
            return 0
        return len(await self.redis.xrange(stream, min=f"({last}", max=str(cutoff_ms), count=count))

    async def _entries(self, model: str, items: builtins.list[Any]) -> builtins.list[Entry]:
        """The entries of a reply; one without a job (deleted meanwhile) is acknowledged."""
        out, empty = [], []
        for entry_id, fields in items:
            job = (fields or {}).get("job")
            if job:
                out.append(Entry(model, entry_id, job))
            else:
                empty.append(Entry(model, entry_id, ""))
        if empty:
            await self.ack(empty)
        return out

    async def ack(self, entries: builtins.list[Entry]) -> None:
        """Acknowledge and delete entries (their jobs' outcomes are stored, or they are not to run)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in entries:
                stream = self.stream(e.model_id)
                pipe.xack(stream, GROUP, e.entry_id)
                pipe.xdel(stream, e.entry_id)
            await pipe.execute()

    async def touch(self, entries: builtins.list[Entry]) -> None:
        """Renew entries whose jobs run here: their idle time starts again (no other server claims them)."""
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(self.stream(e.model_id), []).append(e.entry_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xclaim(stream, GROUP, self.consumer, 0, ids, justid=True)
            await pipe.execute()

    async def aclose(self) -> None:
        await self.redis.aclose()
