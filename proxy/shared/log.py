"""The invalidation log: what a replica missed during a gap, replayed instead of purged.

Every message a replica publishes is also appended to a Redis stream, ``P:events:TOPIC:log``,
in the same script and round trip (``XADD ... MAXLEN ~ N``, N = ``shared.invalidation_log``;
0: no log). The log holds the message's body as sent (sealed with its MAC by the backend,
:mod:`proxy.shared.records`), and the message carries the entry's id in front of it
(``@ID|BODY``), so each replica's :class:`Cursor` remembers the last id it heard on its
subscription (its own messages come back too). While replicas write the previous release's
format (``shared.previous_format = "write"``) there is no log: their readers take messages
as they were.
Delivery on one subscription is in publish order, so the cursor means "everything up to here
was heard".

After a gap (a lost subscription, a listener that died), once subscribed again,
:func:`resume` reads the log after the cursor (``XRANGE``) and hands back exactly what was
missed. It gives up (the caller purges this replica's whole store) when it cannot know what
was missed: no cursor (a message without an id came from a replica of the previous release, or
a listener that died of an error), Redis's epoch changed (:mod:`proxy.shared.epochs`: a
restart or a restored snapshot always purges), or the log does not reach back to the cursor:
the entry under the cursor's id must still be there and hold what was heard (a digest: the id
in a message's header is not sealed, so a forged id ahead of the log purges rather than skips
entries), and every entry after it up to the log's last id (ids count the entries: ``0-1``,
``0-2``, ...; a trimmed or deleted one is a hole); and the log must not be gone or rewound.

Entries are untrusted input like the messages: a body from the log is opened (its MAC
checked) by the same function as a live message's, and its data goes through the same
decoder; an entry of another shape means the replica purges.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc

from proxy.shared.epochs import Epochs
from proxy.shared.metrics import SharedMetrics

# Append the message to the log and publish it with the entry's id, in one round trip. Ids
# count the entries (0-1, 0-2, ...: the last given one plus one, kept by the stream even when
# trimmed empty), so a reader can tell whether anything after its cursor was trimmed.
# KEYS: log. ARGV: body, the log's length (approximate), channel. Returns the id.
PUBLISH_LOGGED = """
if redis.replicate_commands then redis.replicate_commands() end
local id = '0-1'
local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[1])
if ok then
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      local n = string.match(info[i + 1], '^0%-(%d+)$')
      -- Not an id of ours (someone else's stream): Redis's own, and readers purge.
      id = n and ('0-' .. string.format('%d', tonumber(n) + 1)) or '*'
    end
  end
end
id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], id, 'm', ARGV[1])
redis.call('PUBLISH', ARGV[3], '@' .. id .. '|' .. ARGV[1])
return id
"""

# Entries read per XRANGE while replaying, and reads to the log's end (each round reads
# what was added during the previous one).
PAGE = 200
ROUNDS = 3
_ID = re.compile(rb"^([0-9]{1,20})-([0-9]{1,20})$")

StreamId = tuple[int, int]


def parse_id(value: bytes | str) -> StreamId | None:
    """A stream id (``MS-SEQ``), or None for anything else."""
    found = _ID.match(value.encode() if isinstance(value, str) else value)
    return None if found is None else (int(found[1]), int(found[2]))


def text_id(value: StreamId) -> str:
    return f"{value[0]}-{value[1]}"


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message or log entry: its log id (None: not logged) and its body as sent."""

    id: StreamId | None
    body: bytes

    def digest(self) -> bytes:
        """What the log holds under this id, as a digest (the id in front is not sealed)."""
        return hashlib.sha256(self.body).digest()


def split(message: bytes) -> Delivered:
    """``@ID|BODY`` taken apart; any other message is a body that was not logged."""
    if message.startswith(b"@"):
        given, _, body = message[1:].partition(b"|")
        return Delivered(parse_id(given), body)
    return Delivered(None, message)


@dataclass(slots=True)
class Cursor:
    """The last log id this replica heard on one subscription (and a digest of what it said:
    a replay starts only where the log holds the same), in which epoch; ``last`` None:
    unknown (the next gap purges)."""

    epoch: str | None = None
    last: StreamId | None = None
    digest: bytes | None = None

    def heard(self, delivered: Delivered) -> None:
        if delivered.id is None:
            self.forget()  # a change that was not logged: a gap cannot replay its kind
        elif self.last is not None and delivered.id > self.last:
            self.last, self.digest = delivered.id, delivered.digest()

    def forget(self) -> None:
        self.last = self.digest = None

    def at(self, epoch: str | None, where: tuple[StreamId, bytes | None] | None) -> None:
        self.epoch = epoch
        self.last, self.digest = (None, None) if where is None else where


class Log:
    """One topic's log: publishing into it and reading back what a gap missed."""

    def __init__(
        self,
        client: aioredis.Redis,
        channel: str,
        length: int,
        metrics: SharedMetrics,
        epochs: Epochs,
    ) -> None:
        self.client = client
        self.key = channel + ":log"
        self.channel = channel
        self.length = length
        self.metrics = metrics
        self.epochs = epochs
        self.cursor = Cursor()
        self._publish = client.register_script(PUBLISH_LOGGED)

    def publish(self, body: bytes) -> Awaitable[Any]:
        if self.length <= 0:
            return self.client.publish(self.channel, body)
        args: list[bytes | int | str] = [body, self.length, self.channel]
        return self._publish(keys=[self.key], args=args)

    def new_epoch(self, on_gap: Callable[[], None]) -> None:
        """A new Redis epoch is a gap that always purges (nothing of the old log is trusted)."""
        self.cursor.forget()
        self.metrics.cache_gap_recoveries.labels("purged").inc()
        on_gap()

    async def resume(self, after_gap: bool) -> list[Delivered] | None:
        """Just subscribed. The first time: remember where the log ends. After a gap: the
        entries missed since the cursor, oldest first (None: unknown, purge everything);
        the cursor then moves to the log's end either way."""
        cursor, epoch = self.cursor, self.epochs.epoch
        if not after_gap:
            cursor.at(epoch, await self._end())
            return None
        missed = None
        # Ids count entries only as 0-N (see PUBLISH_LOGGED): any other cannot be followed.
        if (
            self.length > 0
            and cursor.last is not None
            and cursor.epoch == epoch
            and not cursor.last[0]
        ):
            missed = await self._since(cursor.last, cursor.digest)
        if missed is None:
            cursor.at(epoch, await self._end())
        elif missed:
            cursor.heard(missed[-1])
        self.metrics.cache_gap_recoveries.labels("purged" if missed is None else "replayed").inc()
        return missed

    async def _end(self) -> tuple[StreamId, bytes | None] | None:
        """The last id the log has given (0-0: none yet) and its entry's digest (None: that
        entry is gone); None without a log."""
        if self.length <= 0:
            return None
        info = await self._info()
        if info is None:
            return (0, 0), None
        tail = info.tail
        if tail is not None and tail.id == info.last:
            return info.last, tail.digest()
        return info.last, None

    async def _since(self, cursor: StreamId, digest: bytes | None) -> list[Delivered] | None:
        """Every entry after ``cursor``, or None when the log does not reach back to it (or
        holds something else under it than what was heard, or has a hole: ids count the
        entries, so a trimmed or deleted one shows)."""
        if digest is not None:
            found = await self._read(text_id(cursor), text_id(cursor))
            if found is None or [(e.id, e.digest()) for e in found] != [(cursor, digest)]:
                return None  # the entry last heard is gone, or was not what the log holds
        entries: list[Delivered] = []
        expected = cursor
        for _ in range(ROUNDS):
            # Read to the end, then check the end is where the log stands (entries added
            # meanwhile: another round); nothing read may be missing on the way.
            found = await self._read("(" + text_id(expected), "+")
            if found is None:
                return None
            for entry in found:
                if entry.id != (0, expected[1] + 1):
                    return None  # trimmed or deleted: cannot tell what it held
                entries.append(entry)
                expected = (0, expected[1] + 1)
            info = await self._info()
            if info is None:  # no log: only right if nothing was ever written
                return entries if cursor == (0, 0) and not entries else None
            if info.last == expected:
                return entries
            if info.last < expected:
                return None  # the log went back: restored or recreated
        return None

    async def _read(self, start: str, end: str) -> list[Delivered] | None:
        """The entries from ``start`` to ``end`` (at most what the log should hold), or None
        when one is not of the shape this release writes, or there are too many."""
        entries: list[Delivered] = []
        while True:
            page: list[Any] = (
                await self.client.xrange(self.key, min=start, max=end, count=PAGE) or []
            )
            for raw_id, fields in page:
                entry = _entry(raw_id, fields)
                if entry is None:
                    return None  # not an entry this release writes: cannot tell what it held
                entries.append(entry)
            if len(page) < PAGE:
                return entries
            if len(entries) > 2 * self.length + PAGE:
                return None  # more than the log should hold: a flood, not a gap to replay
            start = "(" + _text(page[-1][0])

    async def _info(self) -> LogInfo | None:
        """The log's last given id and its last entry, or None when there is no log."""
        try:
            info: dict[Any, Any] = await self.client.xinfo_stream(self.key)
        except rexc.ResponseError:
            return None  # no such key
        value = _field(info, "last-generated-id")
        last = parse_id(value) if isinstance(value, bytes | str) else None
        tail = _field(info, "last-entry")
        return LogInfo(last or (0, 0), _entry(*tail) if _pair(tail) else None)


@dataclass(frozen=True, slots=True)
class LogInfo:
    last: StreamId
    tail: Delivered | None


def _field(info: dict[Any, Any], name: str) -> Any:
    return info.get(name, info.get(name.encode()))


def _pair(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2


async def subscribed(pubsub: Any, channel: str) -> None:
    """Subscribe, and return once Redis confirms it (a refusal, NOPERM, raises here)."""
    await pubsub.subscribe(channel)
    while True:
        message = await pubsub.get_message(timeout=1.0)
        if message and message.get("type") == "subscribe":
            return


def replayed(missed: list[Delivered] | None) -> int | str:
    """For the log line: the entries replayed, or "unknown" (the store was purged)."""
    return "unknown" if missed is None else len(missed)


def _entry(raw_id: Any, fields: Any) -> Delivered | None:
    entry_id = parse_id(raw_id) if isinstance(raw_id, bytes | str) else None
    if entry_id is None or not isinstance(fields, dict) or len(fields) != 1:
        return None
    body = fields.get(b"m")
    return Delivered(entry_id, body) if isinstance(body, bytes) else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
