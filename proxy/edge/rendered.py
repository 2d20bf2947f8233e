"""An answer's head rendered once per shape, the request's own values filled in per answer.

Every fresh hit (and every joiner of a flight) of an entry is answered with the same head
but for three values: its request id, its Age and its Date. Building the head the long way
(the caller's view of the stored headers, :func:`~proxy.edge.answer.answer_headers`, a
``CIMultiDict``, :func:`~proxy.compat.aiohttp.render_response`) costs several µs a request;
here it is done once per shape (:func:`template`) by the same functions, with a slot in
place of each of the three values, and an answer is the shape's bytes with its values put
in (:func:`fill`): byte for byte what the long way renders. A shape is made at each key's
first fresh hit (:func:`render_template`; :func:`template` remembers the shapes no entry's
record keeps), so making it is kept cheap too: the head alone is rendered
(:func:`~proxy.compat.aiohttp.render_head`, no body of its length), and the caller's view
is made without going through the long way's memo of views (which it would only miss).

A shape is everything the head depends on besides those three values (status, stored
headers, the caller's view of them, Cache-Status, X-Proxy-Caller, the body's length).
Should a stored header hold a slot's text itself, that shape has no template (None): its
answers are rendered the long way.
"""

from __future__ import annotations

from yarl import URL

from proxy.compat.aiohttp import render_head
from proxy.edge.answer import HeaderItems, answer_headers, header_view
from proxy.headers import SERVER_NAME
from proxy.memo import memo
from proxy.messages import CacheStatus

# Each value's slot while a shape is rendered: text no header of ours holds (checked: a
# slot found other than once gives no template), without "%", CR, LF or NUL.
SLOTS = (
    (b"rid", b"s", "kp-slot-request-id-5b0e4c7d"),
    (b"age", b"d", "kp-slot-age-91d3aa26"),
    (b"date", b"s", "kp-slot-date-0f6e72b3"),
)
# Rendered heads kept (a handful per entry: status, caller, coding, Cache-Status).
SHAPES = 4096


class Place:
    """Where answers send callers (the upstream whose URLs are moved, the configured public
    URL): one per fast path, a template's key by identity (hashed without hashing a URL)."""

    __slots__ = ("public", "upstream")

    def __init__(self, upstream: URL, public: str) -> None:
        self.upstream, self.public = upstream, public


def render_template(
    status: int,
    items: HeaderItems,
    place: Place,
    scheme: str,
    host: str,
    accepts: bool,
    cache_status: CacheStatus,
    member: str,
    caller: str,
    length: int,
) -> tuple[bytes, bool] | None:
    """The head of an answer of this shape (``length``: its body's) with ``%(rid)s``,
    ``%(age)d`` and ``%(date)s`` where its request id, Age and Date go (a stored Date: no
    slot), its other ``%`` doubled, and whether the body follows it (not for a 304): as
    :func:`fill` fills it. ``scheme`` and ``host``: where the caller reached the proxy
    ("" with a public URL), ``accepts``: it takes gzip (as the caller's view of ``items``
    takes them). None: no template (render this shape the long way)."""
    shown, _ = header_view(items, place.upstream, place.public, scheme, host, accepts)
    rid, age, date = (slot for _, _, slot in SLOTS)
    headers = answer_headers(shown, rid, cache_status, 0, caller=caller, cache=member)
    headers["Age"] = age  # where answer_headers put it
    headers["Server"] = SERVER_NAME  # as FastPath._respond
    head, with_body = render_head(status, headers, length, date=date)  # no body made
    head = head.replace(b"%", b"%%")
    for name, kind, slot in SLOTS:
        found = head.count(slot.encode())
        if found > 1 or (found == 0 and slot != date):
            return None
        head = head.replace(slot.encode(), b"%(" + name + b")" + kind)
    return head, with_body


# Shapes not kept elsewhere: a held entry keeps its last shape's head on its record in the
# memory tier (:class:`~proxy.cache.memory.Kept`), so its first shape is made by
# :func:`render_template` alone (in this memo too, the head was kept twice, and a first touch
# of each of 100,000 keys paid the memo's hash of the entry's headers, its insert and an
# eviction); the memo is for the rest: another shape of a held entry, answers of entries not
# held (a joiner's, a revalidated one).
template = memo(SHAPES, per_key=True)(render_template)


def fill(shape: tuple[bytes, bool], request_id: str, age: int, date: bytes, body: bytes) -> bytes:
    """An answer from its shape (:func:`template`) and its own values."""
    head, with_body = shape
    out = head % {b"rid": request_id.encode(), b"age": age, b"date": date}
    return out + body if with_body else out
