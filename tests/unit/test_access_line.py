"""The access line of a request nothing below the edge noted anything for."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.edge.inbound import Exchange
from proxy.edge.middlewares import ACCESS, PLAIN, access_line, plain_line
from proxy.logs import configure
from tests.unit.test_logs import restore_logging  # noqa: F401 (the fixture)


@dataclass
class Asked:
    """What the access line reads of a request (proxy.edge.inbound.Incoming's fields)."""

    method: str
    remote: str | None
    headers: CIMultiDictProxy[str]
    path: str
    query_string: str


REQUESTS = [
    Asked("GET", "10.0.0.1", CIMultiDictProxy(CIMultiDict()), "/v1/products", ""),
    Asked(
        "GET",
        None,
        CIMultiDictProxy(CIMultiDict({"User-Agent": 'pos "7" ü%s'})),
        "/v1/companies/me/ü%d",
        "a=1&b=%22" + "x" * 2000,
    ),
]


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("request_", REQUESTS)
@pytest.mark.parametrize("elapsed", [0.0, 0.00012345, 1.5])
def test_a_plain_line_is_the_access_line_of_an_untouched_exchange(
    request_: Asked, elapsed: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plain_line (the fast path's, no Exchange or trace made) writes the bytes
    access_line writes for a new Exchange with the same id, caller, cache and bytes."""
    monkeypatch.setattr("time.time", lambda: 1765000000.1234)
    out = io.StringIO()
    configure("info", "json", out)
    info = Exchange("0123abcd", "pos-1", "acct-9", "HIT")
    info.bytes_sent = 8192
    access_line(request_, info, "/v1/products", 200, elapsed)  # type: ignore[arg-type]
    plain_line(request_, "0123abcd", "pos-1", "acct-9", "/v1/products", 200, "HIT", 8192, elapsed)  # type: ignore[arg-type]
    long_way, plain = out.getvalue().splitlines()
    assert plain == long_way
    assert set(PLAIN.keys) < set(ACCESS.keys) and PLAIN.all_keys == ACCESS.keys
