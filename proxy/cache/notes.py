"""A fetch lock owner's *note* to the replicas that waited on its lock (``backend = "redis"``).

When a replica's flight finds another replica's fetch lock on a key, it waits for that fetch
(:meth:`proxy.cache.tiers.RedisEntries.obtain`). Without a cache rule a 304 leaves the entry
not fresh, so there is no fresh entry for the waiter to find in Redis: it used to fetch on its
own, two upstream round trips per flight. Now the owner, letting go of the lock, leaves the
waiters a note of what it got (published in the release's own script,
:mod:`proxy.shared.notes`): a 304 with its headers, the validators it sent and its request and
response times; or only that it is done (then the waiter looks for the entry, as before).

A waiter answers from a 304 note by the rule in-process coalescing keeps (a request is
answered by a revalidation that was in flight when it arrived or began after it, never by an
older one): the note must be for the lock the waiter saw held (its owner token), its 304 must
have come *after* the waiter's flight began, the validators must be those of the waiter's own
stored entry, and no change may have come for the key meanwhile. It then freshens its own
entry with the 304's headers (RFC 9111 4.3.4), as if the 304 had been its own.

A note is untrusted input like a record: sealed with the record MAC over the key it belongs
to (a forged note, or one copied to another key or account, is dropped and counted), at most
:data:`MAX_NOTE` bytes, strict JSON of one known shape (header names that are tokens, values
without CR, LF or NUL, finite times). A note that fails any check is ignored: the waiter goes
on as if none had come (a poll, then a fetch of its own), never answers from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from proxy.cache.records import BadRecord, _header, _name, _pairs, _seconds, _str, _value

FORMAT = 1
MAX_NOTE = 32 * 1024
# The most header lines a note carries (a 304's own headers, a few in practice).
MAX_LINES = 200


@dataclass(frozen=True, slots=True)
class Note:
    """What a fetch lock's owner got: ``got`` "304" (``headers``: the 304's, ``sent``: the
    validators it sent) or "done" (look for the entry)."""

    owner: str
    key: str
    got: Literal["304", "done"]
    sent: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    request_time: float = 0.0
    response_time: float = 0.0


def encode(note: Note) -> bytes | None:
    """The note as sent (None: too large; the waiters are then told only that it is done)."""
    data = json.dumps(
        {
            "v": FORMAT,
            "owner": note.owner,
            "key": note.key,
            "got": note.got,
            "sent": [list(h) for h in note.sent],
            "headers": [list(h) for h in note.headers],
            "request_time": note.request_time,
            "response_time": note.response_time,
        },
        separators=(",", ":"),
    ).encode()
    return data if len(data) <= MAX_NOTE else None


def decode(data: bytes, key: str, holder: str) -> Note:
    """The note for ``key`` left by the lock's ``holder``; raises :class:`BadRecord`."""
    if len(data) > MAX_NOTE:
        raise BadRecord("a note too large")
    try:
        fields: Any = _header(data)
        if type(fields) is not dict or fields.get("v") != FORMAT:
            raise ValueError("a note of an unknown format")
        got = _str(fields["got"])
        if got not in ("304", "done"):
            raise ValueError("a note of an unknown outcome")
        sent, headers = _lines(fields["sent"]), _lines(fields["headers"])
        note = Note(
            owner=_str(fields["owner"]),
            key=_str(fields["key"]),
            got="304" if got == "304" else "done",
            sent=sent,
            headers=headers,
            request_time=_seconds(fields["request_time"], float("inf")),
            response_time=_seconds(fields["response_time"], float("inf")),
        )
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise BadRecord(f"a damaged note ({type(e).__name__})") from None
    if note.key != key or note.owner != holder:
        raise BadRecord("a note for another key or fetch")
    return note


def _lines(value: Any) -> tuple[tuple[str, str], ...]:
    pairs = _pairs(value)
    if len(pairs) > MAX_LINES:
        raise ValueError("too many header lines")
    return tuple((_name(n), _value(v)) for n, v in pairs)
