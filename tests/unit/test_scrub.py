"""Taking the account's secrets out of upstream answers (proxy.auth.scrub)."""

from __future__ import annotations

import gzip
import json

from multidict import CIMultiDict

from proxy.auth.scrub import REDACTED, credentials, scrub_bytes, scrub_headers, scrubbed, spellings
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
