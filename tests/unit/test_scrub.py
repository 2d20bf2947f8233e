"""Taking the account's secrets out of upstream answers (proxy.auth.scrub)."""

from __future__ import annotations

import gzip
import json

from multidict import CIMultiDict

from proxy.auth.scrub import (
    REDACTED,
    credentials,
    scrub_bytes,
    scrub_headers,
    scrubbed,
    scrubbed_now,
    spellings,
)
from proxy.messages import ProxyResponse

SECRET = "abc/def+ghi=jkl"


def test_every_spelling_of_a_secret_is_found_and_short_values_are_not_looked_for() -> None:
    found = spellings((SECRET, "short"))
    assert "short" not in found
    echoes = [
        SECRET,
        json.dumps({"t": SECRET})[7:-2],  # as json.dumps writes it
        SECRET.replace("/", "\\/"),  # as PHP's json_encode writes it
        "abc%2Fdef%2Bghi%3Djkl",  # percent-encoded
    ]
    for echo in echoes:
        assert scrub_bytes(f"x {echo} y".encode(), found) == f"x {REDACTED} y".encode(), echo
    assert credentials("Bearer  tok-123 ") == "tok-123"


def test_headers_are_copied_only_when_they_hold_a_secret() -> None:
    found = spellings((SECRET,))
    clean = CIMultiDict({"A": "b"})
    assert scrub_headers(clean, found) is clean
    dirty = CIMultiDict([("X", f"Bearer {SECRET}"), ("X", "ok")])
    assert scrub_headers(dirty, found).getall("X") == [f"Bearer {REDACTED}", "ok"]
    # Looked for in the values joined: a secret in the last value, and none across two.
    last = CIMultiDict([("A", "b"), ("Y", f"x{SECRET}")])
    assert scrub_headers(last, found).getall("Y") == [f"x{REDACTED}"]
    across = CIMultiDict([("A", SECRET[:5]), ("B", SECRET[5:])])
    assert list(scrub_headers(across, spellings((f"{SECRET[:5]}\n{SECRET[5:]}",))).items()) == [
        ("A", SECRET[:5]),
        ("B", SECRET[5:]),
    ]


async def test_a_gzip_error_body_is_inflated_scrubbed_and_sent_plain() -> None:
    body = gzip.compress(json.dumps({"error": "x", "error_description": SECRET}).encode())
    headers = CIMultiDict({"Content-Encoding": "gzip", "Content-Length": str(len(body))})
    response = await scrubbed(ProxyResponse(400, headers, body), spellings((SECRET,)), "GET")
    assert json.loads(response.body)["error_description"] == REDACTED  # type: ignore[arg-type]
    assert "Content-Encoding" not in response.headers
    assert response.headers["Content-Length"] == str(len(response.body))
    ok = ProxyResponse(200, CIMultiDict(), SECRET.encode())
    assert (await scrubbed(ok, spellings((SECRET,)), "GET")).body == SECRET.encode()


async def test_an_answer_whose_body_is_not_read_is_scrubbed_at_once_as_scrubbed_does() -> None:
    """``scrubbed_now``: a 2xx, a 304 or an answer to HEAD has its headers scrubbed there
    and its body left as it came, as :func:`scrubbed` leaves them; an error's body is
    ``scrubbed``'s to read (nothing touched)."""
    secrets = spellings((SECRET,))
    echo = f"x {SECRET} y".encode()
    for status, method in ((200, "GET"), (204, "GET"), (304, "GET"), (404, "HEAD")):
        now = ProxyResponse(status, CIMultiDict({"X-Echo": SECRET}), body=echo)
        later = ProxyResponse(status, CIMultiDict({"X-Echo": SECRET}), body=echo)
        assert scrubbed_now(now, secrets, method)
        await scrubbed(later, secrets, method)
        assert now.headers["X-Echo"] == later.headers["X-Echo"] == REDACTED
        assert now.body == later.body == echo
    for status in (301, 401, 500):
        error = ProxyResponse(status, CIMultiDict({"X-Echo": SECRET}), body=echo)
        assert not scrubbed_now(error, secrets, "GET")
        assert error.headers["X-Echo"] == SECRET and error.body == echo
        await scrubbed(error, secrets, "GET")
        assert error.headers["X-Echo"] == REDACTED and REDACTED.encode() in error.body
    bare = ProxyResponse(200, CIMultiDict({"X-Echo": SECRET}), body=echo)
    assert scrubbed_now(bare, (), "GET") and bare.headers["X-Echo"] == SECRET
