"""Content codings (RFC 9110 8.4): gzip checked whole, inflated in bounded pieces, negotiated.

The proxy asks Kounta for gzip and keeps what comes back compressed: it is checked
(end marker, CRC32 and ISIZE, RFC 1952) as it arrives, stored compressed with its
``Content-Encoding``, sent as it is to callers that accept gzip and inflated on the way
out for those that do not. Inflating never holds more than :data:`PIECE` bytes of output
at a time, and stops at a size cap and a ratio cap, so a gzip bomb costs neither memory
nor much work. A coding the proxy does not know (``br``, ``x-foo``) passes through
untouched, its header kept, and is never stored.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

from proxy.errors import UpstreamBodyError, UpstreamTooLarge

IDENTITY = ""
GZIP = "gzip"
_GZIP_NAMES = frozenset({"gzip", "x-gzip"})
# zlib's window bits for a gzip wrapper (header and CRC32/ISIZE trailer checked).
_GZIP_WBITS = 16 + zlib.MAX_WBITS
# Inflated bytes handed out at a time.
PIECE = 64 * 1024
# Below this many inflated bytes the ratio is not judged: small JSON can compress very well.
RATIO_FLOOR = 1024 * 1024
# A stored gzip body is inflated at once (and answered with a Content-Length) when it fits
# in this many bytes; larger ones are inflated while streamed.
INFLATE_WHOLE = 1024 * 1024
_QVALUE = re.compile(r"^(?:0(?:\.\d{0,3})?|1(?:\.0{0,3})?)$")
_ACCEPTS: dict[str, bool] = {}
_ACCEPTS_MAX = 1024


@dataclass(frozen=True, slots=True)
class Caps:
    """How far a gzip body may inflate: bytes in all, and times its compressed size."""

    max_size: int = 64 * 1024 * 1024
    max_ratio: int = 200


def coding_of(items: Iterable[tuple[str, str]]) -> str:
    """The body's content coding: ``""`` (none), ``"gzip"``, or the codings as listed."""
    codings: list[str] = []
    for name, value in items:
        if name.lower() == "content-encoding":
            codings += [c.strip().lower() for c in value.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return IDENTITY
    if len(codings) == 1 and codings[0] in _GZIP_NAMES:
        return GZIP
    return ", ".join(codings)


def accepts_gzip(values: Iterable[str]) -> bool:
    """Whether a caller's ``Accept-Encoding`` lines accept gzip (RFC 9110 12.5.3).

    ``gzip`` (or ``x-gzip``) with a q-value above 0, else ``*`` above 0; no header, an
    empty one or an invalid q-value: no (a caller that cannot say so gets plain bytes).
    """
    key = ",".join(values)
    found = _ACCEPTS.get(key)
    if found is None:
        if len(_ACCEPTS) >= _ACCEPTS_MAX:
            _ACCEPTS.clear()
        found = _ACCEPTS[key] = _accepts(key)
    return found


def _accepts(value: str) -> bool:
    gzip_q: float | None = None
    any_q: float | None = None
    for member in value.split(","):
        coding, *params = member.split(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params:
            name, _, arg = param.partition("=")
            if name.strip().lower() == "q":
                arg = arg.strip()
                q = float(arg) if _QVALUE.match(arg) else 0.0
        if coding in _GZIP_NAMES:
            gzip_q = q if gzip_q is None else max(gzip_q, q)
        elif coding == "*":
            any_q = q
    if gzip_q is not None:
        return gzip_q > 0
    return any_q is not None and any_q > 0


class Inflater:
    """One gzip body inflated piece by piece (RFC 1952; members one after another allowed).

    :meth:`feed` yields pieces of at most :data:`PIECE` bytes and checks the caps after
    each, so a bomb is stopped after about :data:`RATIO_FLOOR` bytes of work; :meth:`finish`
    says whether the stream ended properly. Corrupt data and a failed CRC32 or ISIZE
    check are :class:`UpstreamBodyError`, like a stream cut short.
    """

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self._z = zlib.decompressobj(_GZIP_WBITS)
        self.taken = 0  # compressed bytes consumed
        self.given = 0  # inflated bytes produced
        self._padding = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        pending = False  # a full piece came out: zlib may hold more output for this input
        while data or pending:
            if self._z.eof:
                data = self._next_member(data)
                if not data:
                    return
            try:
                out = self._z.decompress(data, PIECE)
            except zlib.error as e:
                raise UpstreamBodyError(f"The upstream's gzip body is corrupt ({e})") from None
            tail = self._z.unused_data if self._z.eof else self._z.unconsumed_tail
            self.taken += len(data) - len(tail)
            self.given += len(out)
            self._check()
            if out:
                yield out
            data = tail
            pending = len(out) == PIECE and not self._z.eof

    def _next_member(self, data: bytes) -> bytes:
        """After a member's end: another member, or NUL padding (which gzip tolerates)."""
        if self._padding or not data.strip(b"\0"):
            if data.strip(b"\0"):
                raise UpstreamBodyError("The upstream's gzip body has data after its padding")
            self._padding = True
            return b""
        self._z = zlib.decompressobj(_GZIP_WBITS)
        return data

    def _check(self) -> None:
        caps = self.caps
        if self.given > caps.max_size:
            raise UpstreamTooLarge(
                f"The upstream's gzip body inflates to more than {caps.max_size} bytes "
                "(upstream.max_inflated_size)"
            )
        if self.given > RATIO_FLOOR and self.given > caps.max_ratio * max(self.taken, 1):
            raise UpstreamTooLarge(
                f"The upstream's gzip body inflates more than {caps.max_ratio} times its size "
                "(upstream.max_inflate_ratio)"
            )

    def finish(self) -> None:
        """Raise unless the stream ended with a complete member (an empty body is fine)."""
        if self.taken and not self._z.eof:
            raise UpstreamBodyError(
                "The upstream's gzip body ended before its end marker (truncated)"
            )


def check(body: bytes, caps: Caps) -> None:
    """Verify a whole gzip body without keeping what it inflates to."""
    inflater = Inflater(caps)
    for _ in inflater.feed(body):
        pass
    inflater.finish()


async def checked(chunks: AsyncIterable[bytes], caps: Caps) -> AsyncIterator[bytes]:
    """The chunks as they are, each verified before it is passed on, the end checked last."""
    inflater = Inflater(caps)
    async for chunk in chunks:
        for _ in inflater.feed(chunk):
            pass
        yield chunk
    inflater.finish()


async def inflated(chunks: AsyncIterable[bytes], caps: Caps) -> AsyncIterator[bytes]:
    """The inflated body, piece by piece (for a caller that does not accept gzip)."""
    inflater = Inflater(caps)
    async for chunk in chunks:
        for piece in inflater.feed(chunk):
            yield piece
    inflater.finish()


def inflate_whole(body: bytes, caps: Caps, limit: int = INFLATE_WHOLE) -> bytes | None:
    """The whole inflated body if it is complete and at most ``limit`` bytes, else None."""
    inflater = Inflater(caps)
    pieces: list[bytes] = []
    size = 0
    try:
        for piece in inflater.feed(body):
            size += len(piece)
            if size > limit:
                return None
            pieces.append(piece)
        inflater.finish()
    except (UpstreamBodyError, UpstreamTooLarge):
        return None
    return b"".join(pieces)


def inflate_prefix(body: bytes, coding: str, limit: int, caps: Caps | None = None) -> bytes:
    """At most ``limit`` bytes of what a (possibly cut) body says, for the proxy to read
    itself (error bodies, token answers, pages): gzip inflated as far as it goes, a coding
    it does not know as nothing."""
    if coding == IDENTITY:
        return body[:limit]
    if coding != GZIP:
        return b""
    inflater = Inflater(caps or Caps(max_size=limit))
    pieces: list[bytes] = []
    size = 0
    try:
        for piece in inflater.feed(body):
            pieces.append(piece)
            size += len(piece)
            if size >= limit:
                break
    except (UpstreamBodyError, UpstreamTooLarge):
        pass  # what inflated before the fault is still worth reading
    return b"".join(pieces)[:limit]
