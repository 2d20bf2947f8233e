"""Epochs of a Redis: telling a restarted, rewound or emptied Redis from the one replicas
checked, so that no cache record a write invalidated comes back from an older snapshot.

A Redis that restarted may have come back from an older snapshot (or without its data), and a
snapshot holds cache records that writes since invalidated. So the backend's probe reads the
server's ``run_id`` (new at every start) and ``P:epoch`` (``RUN_ID:RANDOM``) in one round
trip (:meth:`Epochs.read`); when either differs from what this replica accepted (or the key is
gone: data lost), the data is from a new *epoch* (:meth:`Epochs.begin`): a replica that finds
``P:epoch`` not named for this run deletes the cache entries in Redis and then names a new
epoch; every replica that used an older one purges its own store (its listeners' gap), logs
and counts it, and only then uses Redis again. Every new connection of the data pool checks
the run id too (:meth:`Epochs.check_connection`), so no request reads a restarted Redis
before that. Where ``INFO`` is refused (a managed Redis may rename it), ``P:epoch`` alone
tells an epoch (lost data, not a restart from a snapshot).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc

from proxy.logs import event
from proxy.shared.metrics import SharedMetrics

# Name a new epoch "RUN_ID:RANDOM" unless a replica named one for this run already; returns
# the epoch. KEYS: epoch. ARGV: run id, the new name.
NAME_EPOCH = """
local current = redis.call('GET', KEYS[1])
if current and string.sub(current, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then return current end
redis.call('SET', KEYS[1], ARGV[2])
return ARGV[2]
"""


class Epochs:
    def __init__(self, prober: aioredis.Redis, prefix: str, metrics: SharedMetrics) -> None:
        """``prober``: a client of its own (it may talk to a Redis of a new epoch)."""
        self.prober = prober
        self.prefix = prefix
        self.metrics = metrics
        self.key = f"{prefix}:epoch"
        # The run id of the Redis whose data this replica checked, and P:epoch as accepted.
        self.run_id: str | None = None
        self.epoch: str | None = None
        # Told when a new epoch began (the pub/sub listeners' gap: purge this replica's store).
        self.gaps: list[Callable[[], None]] = []
        self._name = prober.register_script(NAME_EPOCH)

    async def check_connection(self, connection: Any) -> None:
        """A new connection of the data pool: refused while the server is not the one whose
        data this replica checked (a restart the probe has not handled yet)."""
        await connection.on_connect()
        await connection.send_command("INFO", "server")
        try:
            run_id = run_id_of(await connection.read_response())
        except rexc.ResponseError:
            run_id = ""  # INFO refused: the probe goes by P:epoch alone
        if self.run_id is not None and run_id != self.run_id:
            raise rexc.ConnectionError("the shared store restarted (a new epoch)")

    async def read(self) -> tuple[str, str | None]:
        """The server's run id and ``P:epoch`` now (one round trip)."""
        pipe = self.prober.pipeline(transaction=False)
        pipe.execute_command("INFO", "server")
        pipe.get(self.key)
        info, epoch = await pipe.execute(raise_on_error=False)
        if isinstance(epoch, Exception):
            raise epoch
        run_id = "" if isinstance(info, rexc.ResponseError) else run_id_of(info)
        return run_id, None if epoch is None else _text(epoch)

    def changed(self, run_id: str, epoch: str | None) -> bool:
        return run_id != self.run_id or epoch is None or epoch != self.epoch

    async def begin(self, run_id: str, epoch: str | None) -> None:
        """Redis restarted, or lost or rewound its data, or another replica found it so: what
        it holds of the cache may be records that writes since invalidated. Unless a replica
        did already for this run, delete them and then name the new epoch; purge this
        replica's own store (the gaps) if it used an older one."""
        if epoch is None or not epoch.startswith(run_id + ":"):
            removed = 0
            async for batch in _batches(self.prober.scan_iter(match=self._cache_pattern)):
                removed += int(await self.prober.unlink(*batch))
            keys, args = [self.key], [run_id, f"{run_id}:{uuid.uuid4().hex}"]
            epoch = _text(await self._name(keys=keys, args=args))
            event("shared_epoch_purged", logging.WARNING, removed=removed)
        older = self.epoch
        self.run_id, self.epoch = run_id, epoch
        if older is None:
            return  # this replica's first look: it holds nothing of an older epoch
        self.metrics.shared_epoch_changes.inc()
        event("shared_new_epoch", logging.WARNING)
        for gap in self.gaps:
            gap()

    @property
    def _cache_pattern(self) -> str:
        escaped = "".join(f"\\{c}" if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}:cache:*"


def run_id_of(info: Any) -> str:
    """The server's run id from ``INFO server`` (parsed or raw); "" when not given."""
    if isinstance(info, dict):
        return str(info.get("run_id", ""))
    text = _text(info) if isinstance(info, bytes | str) else ""
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.partition(":")[2].strip()
    return ""


async def _batches(keys: AsyncIterator[Any], size: int = 500) -> AsyncIterator[list[Any]]:
    batch: list[Any] = []
    async for key in keys:
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
